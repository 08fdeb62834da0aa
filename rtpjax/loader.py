"""Hugging Face safetensors checkpoints (one file or a sharded index) -> a sharded parameter pytree.

Knows files and shardings, not models' maths: the family's `weight_names` says which tensors make each parameter and
`decoder.param_shapes` what shape it must have. Every tensor is memory-mapped, checked, transformed (transpose,
stack, cast) and placed with its NamedSharding; any mismatch fails naming the tensor and its file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from rtpjax.models import decoder, load_config
from rtpjax.models.config import ModelConfig
from rtpjax.sharding import param_shardings

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
# Tensors checkpoints carry that no supported model reads.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be, naming the tensor and file."""


def read_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors header, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: bad safetensors header (claims {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: bad safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of {data_size} data bytes")
        info["data_start"] = 8 + header_len + begin
    return header


class Checkpoint:
    """All tensors of a checkpoint folder, by name, as zero-copy memory maps."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        self.where: dict[str, Path] = {}
        self.headers: dict[Path, dict] = {}
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise CheckpointError(f"{index}: lists {name}, which is missing")
            self.headers[path] = read_header(path)
            for tensor in self.headers[path]:
                self.where[tensor] = path

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> np.ndarray:
        path = self.where[name]
        info = self.headers[path][name]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        return np.memmap(path, dtype=dtype, mode="r", offset=info["data_start"], shape=tuple(info["shape"]))


def _assemble(ckpt: Checkpoint, path: str, source: decoder.HFTensor, shape, dtype) -> np.ndarray:
    parts = []
    for name in source.names:
        array = ckpt.get(name)
        expected = shape[1:] if len(source.names) > 1 else shape
        expected = tuple(reversed(expected)) if source.linear else tuple(expected)
        if array.shape != expected:
            raise CheckpointError(
                f"{ckpt.where[name]}: tensor {name!r} has shape {list(array.shape)}, expected {list(expected)} "
                f"(for parameter {path})"
            )
        parts.append(array.T if source.linear else array)
    array = np.stack(parts) if len(parts) > 1 else parts[0]
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def load_params(model_dir: str | Path, cfg: ModelConfig, family, mesh=None, progress: bool = False) -> dict:
    """Read, check and place every parameter; returns the nested pytree `forward` takes."""
    from tqdm import tqdm

    ckpt = Checkpoint(model_dir)
    sources = family.weight_names(cfg)
    shapes = decoder.param_shapes(cfg)
    assert set(sources) == set(shapes), f"{family.__name__}: weight map and param shapes disagree"  # a bug, not input
    wanted = {name for source in sources.values() for name in source.names}
    missing = sorted(wanted - ckpt.names())
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:8])}")
    unexpected = ckpt.names() - wanted
    if cfg.tie_word_embeddings:
        unexpected.discard("lm_head.weight")  # some tied checkpoints still carry a copy
    unexpected = sorted(n for n in unexpected if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        name = unexpected[0]
        raise CheckpointError(
            f"{ckpt.where[name]}: unexpected tensor(s) {', '.join(unexpected[:8])} for a {cfg.architecture}"
        )
    shardings = param_shardings(shapes, family.PARTITION_RULES, mesh) if mesh is not None else {}
    flat = {}
    total = sum(int(np.prod(s)) * np.dtype(cfg.jnp_dtype).itemsize for s in shapes.values())
    with tqdm(total=total, desc="loading", unit="B", unit_scale=True, disable=not progress) as bar:
        for path, source in sources.items():
            host = _assemble(ckpt, path, source, shapes[path], cfg.jnp_dtype)
            flat[path] = jax.device_put(host, shardings.get(path))
            bar.update(host.nbytes)
    return decoder.nest(flat)


def load_model(model_dir: str | Path, dtype: str | None = None, mesh=None, progress: bool = False):
    """(config, family module, params) for a Hugging Face folder or a .gguf file; `dtype` overrides the checkpoint's."""
    from rtpjax.gguf_loader import resolve_model

    model_dir = resolve_model(model_dir)
    cfg, family = load_config(model_dir)
    if dtype is not None:
        cfg = cfg.with_dtype(dtype)
    return cfg, family, load_params(model_dir, cfg, family, mesh, progress)
