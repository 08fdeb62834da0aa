"""Load a model's tokenizer without importing torch where that is safe: `AutoTokenizer` pulls in torch through
transformers' config machinery, which costs 13 s of a server's start on a CUDA machine; the tokenizer needs none of it.
"""

from __future__ import annotations

import json
import threading
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


# What a Hugging Face tokenizer is built from: the Rust tokenizer, sentencepiece, BPE or WordPiece vocabularies (and
# tiktoken files, matched by suffix).
_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def tokenizer_source(model: str | Path, tokenizer: str | Path | None, skip: bool) -> str | None:
    """The folder the tokenizer loads from (`tokenizer` if given, else the model's), or None with skip_tokenizer_init.

    Checked now, before any weights load: on a folder with no tokenizer files transformers either fails deep inside
    (Llama, Mistral) or builds an empty tokenizer that encodes every text to nothing (Qwen2).
    """
    if skip:
        return None
    folder = Path(tokenizer or model)
    if not any((folder / name).is_file() for name in _FILES) and not any(folder.glob("*.tiktoken")):
        raise ValueError(f"{folder} has no tokenizer files ({', '.join(_FILES)}): pass --tokenizer DIR with the "
                         "model's tokenizer, or skip_tokenizer_init=True to send and get token ids only")
    return str(folder)


# Engines load their tokenizer on a thread of their own; one whose start failed leaves that thread importing
# transformers, and a second thread importing from the half-built lazy module gets "cannot import name". One at a time.
_LOADING = threading.Lock()


def load_tokenizer(path: str | Path | None):
    """The Hugging Face tokenizer of `path`: a plain fast tokenizer when the folder declares one, else AutoTokenizer;
    None for no path (skip_tokenizer_init)."""
    if path is None:
        return None
    with _LOADING:
        if tokenizer_class(path) in _PLAIN_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)


def fast_encoder(tokenizer):
    """`tokenizer.encode(text, add_special_tokens=True)` as a function; for a stock Hugging Face fast tokenizer, its
    Rust tokenizer's encode_batch_fast instead: the same ids without the offsets and the Python wrapping, which cost
    more than the tokenizing itself (a router tokenizes every prompt it routes)."""
    try:
        from transformers import PreTrainedTokenizerBase, TokenizersBackend
    except ImportError:  # transformers < 5 wraps the Rust tokenizer differently
        return tokenizer.encode
    cls, rust = type(tokenizer), getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(tokenizer, TokenizersBackend) or not hasattr(rust, "encode_batch_fast"):
        return tokenizer.encode
    if cls.encode is not PreTrainedTokenizerBase.encode or cls._encode_plus is not TokenizersBackend._encode_plus:
        return tokenizer.encode  # a tokenizer class that adds to what the Rust tokenizer does
    tokenizer.encode("")  # sets the Rust tokenizer up as encode runs it: no truncation or padding

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        return rust.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    return encode
