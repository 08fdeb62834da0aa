"""The device side of a step: bucketed inputs, the compiled model and sampler executables, prompt scoring."""
