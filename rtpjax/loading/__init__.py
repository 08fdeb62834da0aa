"""From a model argument to parameters on the devices: folders, GGUF files, converted checkpoints, tokenizers."""
