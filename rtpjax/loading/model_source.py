"""What a model argument means, and what kind of checkpoint it holds: the one place that decides which reader loads it.

A model argument is None (the embedded SmolLM2-135M-Instruct), a .gguf file (its converted folder, made once) or a
Hugging Face folder; a folder holds safetensors (loader), a converted orbax tree (orbax_checkpoint), or only its
config.json when the weights are made up (load_format="dummy").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rtpjax.loading import gguf

# rtpjax never downloads a model: a name that is no local path must fail at once, not after transformers' hub retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOAD_FORMATS = ("auto", "dummy")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_WHAT = "a Hugging Face folder with config.json, a .gguf file, or nothing for the embedded SmolLM2-135M-Instruct"


def check_model(model: str | Path | None) -> None:
    """Fail now, in one line, for a model argument that names nothing loadable (before any heavy import)."""
    if model is None or str(model).endswith(".gguf") and Path(model).is_file():
        return
    path = Path(model)
    if not path.exists() and _HUB_ID.fullmatch(str(model)):
        raise ValueError(f"{model}: no such folder; it looks like a model hub id, and rtpjax has no model hub access "
                         f"(it downloads nothing): download the model yourself and pass its folder or .gguf file "
                         f"({_WHAT})")  # fmt: skip
    if not path.exists():
        raise ValueError(f"{model}: no such file or folder (give {_WHAT})")
    if not path.is_dir():
        raise ValueError(f"{model}: not a model folder or a .gguf file (give {_WHAT})")
    if not (path / "config.json").is_file():
        raise ValueError(f"{model}: no config.json: not a Hugging Face model folder (give {_WHAT})")


def resolve_model(model: str | Path | None) -> str:
    """A model argument -> the Hugging Face folder it stands for."""
    from rtpjax.models.config import read_config_json

    check_model(model)
    if model is None:
        model = gguf.default_gguf()
    if str(model).endswith(".gguf"):
        return str(gguf.cached_folder(model))
    read_config_json(model)  # a config.json that is no model's fails here, before anything else is asked of it
    return str(model)


def load_model(model: str | Path | None, dtype: str | None = None, mesh=None, progress: bool = False,
               load_format: str = "auto", quantization: str | None = None,
               quantized_decode: str = "auto", quantize_lm_head: bool = False):  # fmt: skip
    """(config, family module, params) for a model argument; `dtype` overrides the checkpoint's.

    load_format "dummy" reads only config.json and makes random weights on the devices. quantization: a
    `quantization.METHODS` name (a converted or pre-quantized checkpoint loads as it was written). quantized_decode:
    how decode-sized steps multiply by quantized weights on a GPU (`rtpjax.quant.matmul.decode_by`).
    quantize_lm_head: the output head too, by `quantization` (`quantization.quantize_head`).
    """
    from rtpjax.loading.quantization import quantize_head
    from rtpjax.quant.matmul import decode_by

    cfg, family, params = _load(model, dtype, mesh, progress, load_format, quantization)
    if quantize_lm_head:
        params = quantize_head(params, cfg.tie_word_embeddings, quantization, mesh)
    return cfg, family, decode_by(params, quantized_decode)


def _load(model, dtype, mesh, progress: bool, load_format: str, quantization: str | None):
    from rtpjax.loading.loader import load_params, random_params
    from rtpjax.loading.orbax_checkpoint import is_converted, restore_params
    from rtpjax.loading.quantization import check_method
    from rtpjax.models import load_config
    from rtpjax.quant.checkpoints import load_prequantized, quant_config

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}: choose one of {', '.join(LOAD_FORMATS)}")
    check_method(quantization)
    model_dir = resolve_model(model)
    cfg, family = load_config(model_dir)
    if dtype is not None:
        cfg = cfg.with_dtype(dtype)
    if load_format == "dummy":
        return cfg, family, random_params(cfg, family, mesh, quantization=quantization)
    if is_converted(model_dir):
        return cfg, family, restore_params(model_dir, cfg, family, mesh, progress, quantization)
    if quant_config(model_dir) is not None:  # pre-quantized (compressed-tensors, GPTQ, AWQ, fp8): loads as made
        return cfg, family, load_prequantized(model_dir, cfg, family, mesh, quantization)
    return cfg, family, load_params(model_dir, cfg, family, mesh, progress, quantization=quantization)
