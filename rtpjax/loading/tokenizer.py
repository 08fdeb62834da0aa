"""Load a model's tokenizer without importing torch where that is safe: `AutoTokenizer` pulls in torch through
transformers' config machinery, which costs 13 s of a server's start on a CUDA machine; the tokenizer needs none of it.
"""

from __future__ import annotations

import json
from pathlib import Path

# Classes that are exactly tokenizer.json run by the Rust `tokenizers` library, with nothing added in Python.
_PLAIN_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def tokenizer_class(path: str | Path) -> str | None:
    config = Path(path) / "tokenizer_config.json"
    if not (Path(path) / "tokenizer.json").is_file() or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # AutoTokenizer reports what is wrong with it


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer of `path`: a plain fast tokenizer when the folder declares one, else AutoTokenizer."""
    if tokenizer_class(path) in _PLAIN_CLASSES:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
