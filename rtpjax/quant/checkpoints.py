"""Pre-quantized Hugging Face checkpoints, loaded as they are: each quantized linear becomes the `QuantizedWeight` the
matmul reads, converted on the host (int4 repacked to our layout, scales transposed to [out, groups]) and placed in
its sharding. Everything else (embedding, norms, the head unless the checkpoint quantized it) loads as usual, in the
model's dtype.

Formats (config.json `quantization_config.quant_method`):
- compressed-tensors (llm-compressor's output): float-quantized (FP8_DYNAMIC: e4m3 weights per channel or 128 x 128
  blocks, tokens quantized on the fly), int-quantized (W8A8 int8), pack-quantized (W4A16: int4 packed eight per int32
  along the input axis, group scales, zero points packed along the output axis when asymmetric). A static input scale
  is ignored: activations are quantized per token, as FP8_DYNAMIC does.
- gptq (AutoGPTQ / GPTQModel): qweight [in/8, out] int32, qzeros [groups, out/8] (stored less one), scales
  [groups, out], g_idx (act order becomes a permutation of the inputs).
- awq (AutoAWQ, GEMM): qweight [in, out/8] int32 with nibbles in AWQ's order, qzeros, scales.
- fp8 (DeepSeek-V3, Qwen3-FP8): e4m3 weights with `weight_scale_inv` per 128 x 128 block (a multiplier, despite the
  name), W8A8 with activations per token and block.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rtpjax.loading.loader import Checkpoint, CheckpointError, _DTYPES, target_shardings
from rtpjax.loading.quantization import QuantizedWeight, Scheme, is_quantized_param, pack_int4, weight_shardings
from rtpjax.models import decoder
from rtpjax.models.config import ModelConfig

log = logging.getLogger("rtpjax")
METHODS = ("compressed-tensors", "gptq", "awq", "fp8")
_AWQ_SHIFTS = np.array([0, 16, 4, 20, 8, 24, 12, 28], np.uint32)  # output column j of 8 sits at this bit offset
_NIBBLES = np.arange(8, dtype=np.uint32) * 4


def quant_config(model_dir: str | Path) -> dict | None:
    """config.json's quantization_config when the checkpoint is one this module loads, else None; an unknown method
    fails here, naming the ones that load."""
    config = Path(model_dir) / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if not qc:
        return None
    method = qc.get("quant_method")
    if method not in METHODS:
        raise CheckpointError(f"{config}: quantization_config.quant_method {method!r} is not supported; rtpjax loads "
                              f"{', '.join(METHODS)} checkpoints")  # fmt: skip
    return qc


class _Reader:
    """Tensors of a checkpoint as host numpy arrays (memory-mapped, one copy when converted)."""

    def __init__(self, model_dir):
        self.ckpt = Checkpoint(model_dir)

    def has(self, name: str) -> bool:
        return name in self.ckpt.where

    def __call__(self, name: str) -> np.ndarray:
        if not self.has(name):
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        path = self.ckpt.where[name]
        info = self.ckpt.headers[path][name]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        return np.memmap(path, dtype, "r", info["data_start"], (count,)).reshape(info["shape"])


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


def _nibbles(packed: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """int32 words -> their 8 nibbles along a new last axis, the i-th from bit shifts[i]."""
    return ((packed.astype(np.uint32)[..., None] >> shifts) & 15).astype(np.uint8)


def _int4(u: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, group: int, perm=None) -> QuantizedWeight:
    """Unsigned nibbles u [out, in], scale / zero [out, in/group] -> our QuantizedWeight (symmetric when every zero
    point is 8)."""
    if zero is not None and np.all(zero == 8):
        zero = None
    scheme = Scheme("int4", group=0 if group == u.shape[1] else group, symmetric=zero is None)
    return QuantizedWeight(pack_int4(u, group), _f32(scale), scheme, zero=zero, perm=perm)


def _group(qc: dict, in_features: int) -> int:
    g = int(qc.get("group_size") or -1)
    return in_features if g <= 0 else g


def _gptq(read: _Reader, module: str, qc: dict, out: int, in_features: int) -> QuantizedWeight:
    if qc.get("bits", 4) != 4:
        raise CheckpointError(f"{module}: GPTQ with {qc.get('bits')} bits; rtpjax loads 4-bit GPTQ")
    group = _group(qc, in_features)
    u = _nibbles(read(f"{module}.qweight"), _NIBBLES).transpose(0, 2, 1).reshape(in_features, out).T
    zero = _nibbles(read(f"{module}.qzeros"), _NIBBLES).reshape(-1, out).T
    if qc.get("checkpoint_format", "gptq") != "gptq_v2":
        zero = (zero + 1) & 15  # AutoGPTQ stores zero points less one
    scale = _f32(read(f"{module}.scales")).T
    perm = None
    if read.has(f"{module}.g_idx"):
        g_idx = np.asarray(read(f"{module}.g_idx"), np.int64)
        if not np.array_equal(g_idx, np.arange(in_features) // group):  # act order: group inputs contiguously
            perm = np.argsort(g_idx, kind="stable").astype(np.int32)
            u = u[:, perm]
    return _int4(np.ascontiguousarray(u), scale, np.ascontiguousarray(zero), group, perm)


def _awq(read: _Reader, module: str, qc: dict, out: int, in_features: int) -> QuantizedWeight:
    if qc.get("bits", qc.get("w_bit", 4)) != 4 or qc.get("version", "gemm").lower() != "gemm":
        raise CheckpointError(f"{module}: AWQ {qc.get('version')} with {qc.get('bits')} bits; rtpjax loads 4-bit GEMM")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    u = _nibbles(read(f"{module}.qweight"), _AWQ_SHIFTS).reshape(in_features, out).T
    zero = _nibbles(read(f"{module}.qzeros"), _AWQ_SHIFTS).reshape(-1, out).T
    scale = _f32(read(f"{module}.scales")).T
    if not qc.get("zero_point", True):
        zero = np.full_like(zero, 8)
    return _int4(np.ascontiguousarray(u), scale, np.ascontiguousarray(zero), group)


def _ct_scheme(qc: dict) -> dict:
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1:
        raise CheckpointError(f"compressed-tensors with {len(groups)} config groups; rtpjax loads one scheme for "
                              "every linear")  # fmt: skip
    return groups[0]


def _compressed_tensors(read: _Reader, module: str, qc: dict, out: int, in_features: int) -> QuantizedWeight:
    group_cfg = _ct_scheme(qc)
    weights, acts = group_cfg["weights"], group_cfg.get("input_activations")
    strategy, fmt = weights.get("strategy", "channel"), qc.get("format")
    scale = _f32(read(f"{module}.weight_scale"))
    if weights["num_bits"] == 4 and fmt == "pack-quantized":
        shape = tuple(int(x) for x in read(f"{module}.weight_shape")) if read.has(f"{module}.weight_shape") else None
        if shape not in (None, (out, in_features)):
            raise CheckpointError(f"{module}.weight_shape is {list(shape)}, the model needs {[out, in_features]}")
        u = _nibbles(read(f"{module}.weight_packed"), _NIBBLES).reshape(out, -1)[:, :in_features]
        group = int(weights.get("group_size") or in_features) if strategy == "group" else in_features
        zero = None
        if read.has(f"{module}.weight_zero_point"):  # packed along the output axis, signed + 8
            packed = read(f"{module}.weight_zero_point").T  # [groups, out/8]
            zero = np.ascontiguousarray(_nibbles(packed, _NIBBLES).reshape(packed.shape[0], -1)[:, :out].T)
        return _int4(np.ascontiguousarray(u), scale.reshape(out, -1), zero, group)
    if weights["num_bits"] != 8 or fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise CheckpointError(f"{module}: compressed-tensors {fmt} with {weights['num_bits']}-bit weights is not "
                              "supported (FP8_DYNAMIC, W8A8 int8 and W4A16 pack-quantized are)")  # fmt: skip
    if not weights.get("symmetric", True) or read.has(f"{module}.weight_zero_point") and weights["type"] == "int" \
            and np.any(read(f"{module}.weight_zero_point")):  # fmt: skip
        raise CheckpointError(f"{module}: asymmetric 8-bit weights are not supported")
    kind = "fp8" if weights["type"] == "float" else "int8"
    act = None if acts is None else ("fp8" if acts.get("type") == "float" else "int8")
    q = np.asarray(read(f"{module}.weight"))
    if strategy == "block":
        rows, group = (int(b) for b in weights["block_structure"])
        return _blocked(q, scale, kind, act, rows, group, module)
    scale = np.broadcast_to(scale.reshape(-1, 1), (out, 1)).copy()  # "tensor": one scale for every channel
    return QuantizedWeight(q, scale, Scheme(kind, act=act))


def _blocked(q, scale, kind, act, rows, group, module) -> QuantizedWeight:
    out, in_features = q.shape
    if out % rows or in_features % group or scale.shape != (out // rows, in_features // group):
        raise CheckpointError(f"{module}: {list(q.shape)} weight with {list(scale.shape)} block scales of "
                              f"{rows} x {group}: rtpjax needs whole blocks")  # fmt: skip
    return QuantizedWeight(np.asarray(q), _f32(scale), Scheme(kind, act=act, group=group, block_rows=rows))


def _fp8_blocks(read: _Reader, module: str, qc: dict, out: int, in_features: int) -> QuantizedWeight:
    rows, group = qc.get("weight_block_size") or (128, 128)
    return _blocked(read(f"{module}.weight"), read(f"{module}.weight_scale_inv"), "fp8", "fp8", rows, group, module)


_READERS = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors, "fp8": _fp8_blocks}
_MARKERS = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_scale", "fp8": "weight_scale_inv"}


def _stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Experts' weights on a new leading axis (they share one scheme)."""
    if len({w.scheme for w in weights}) != 1 or len({w.perm is None for w in weights}) != 1:
        raise CheckpointError("experts of one layer are quantized differently; rtpjax stacks one scheme")
    if weights[0].perm is not None:
        raise CheckpointError("act-order (g_idx) experts are not supported")
    return jax.tree.map(lambda *a: np.stack(a), *weights)


def load_prequantized(model_dir, cfg: ModelConfig, family, mesh=None, quantization: str | None = None) -> dict:
    """The parameter pytree of a pre-quantized checkpoint; `quantization` must be None (it loads as it was made)."""
    qc = quant_config(model_dir)
    method = qc["quant_method"]
    if quantization is not None:
        raise CheckpointError(f"{model_dir}: already quantized ({method}); load it without --quantization")
    read = _Reader(model_dir)
    shapes = decoder.param_shapes(cfg)
    shardings = target_shardings(shapes, family, mesh, cfg)
    flat, counts = {}, {}
    for path, source in family.weight_names(cfg).items():
        modules = [name.removesuffix(".weight") for name in source.names]
        out, in_features = shapes[path][-2:] if len(shapes[path]) >= 2 else (None, None)
        # (the head as well where the checkpoint quantized it, as GPTQ's lm_head_quantized and llm-compressor may)
        if (is_quantized_param(path) or path == "lm_head") and read.has(f"{modules[0]}.{_MARKERS[method]}"):
            parts = [_READERS[method](read, m, qc, out, in_features) for m in modules]
            qw = parts[0] if len(parts) == 1 else _stack(parts)
            whole = shardings[path].is_fully_replicated
            qw = dataclasses.replace(qw, scheme=dataclasses.replace(qw.scheme, whole=whole))
            flat[path] = jax.device_put(qw, weight_shardings(shardings[path], qw))
            counts[qw.scheme] = counts.get(qw.scheme, 0) + 1
        else:
            arrays = [_f32(read(name)) if read(name).dtype == ml_dtypes.float8_e4m3fn else read(name)
                      for name in source.names]  # fmt: skip
            host = arrays[0] if len(arrays) == 1 else np.stack(arrays)
            if tuple(host.shape) != tuple(shapes[path]):
                raise CheckpointError(f"{model_dir}: {source.names[0]} has shape {list(host.shape)}, expected "
                                      f"{list(shapes[path])} (for parameter {path})")  # fmt: skip
            flat[path] = jax.device_put(np.asarray(host).astype(cfg.jnp_dtype), shardings[path])
    log.info("loaded a %s checkpoint: %s", method, ", ".join(f"{n} linears as {s}" for s, n in counts.items()))
    params = decoder.nest(flat)
    jax.block_until_ready(params)
    return params
