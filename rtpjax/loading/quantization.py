"""Quantized linear weights: how they are stored (`Scheme`, `QuantizedWeight`), quantized at load and dequantized.

Three storage kinds, each with one float32 scale per block of the [out, in] weight:
- int8 / fp8 (e4m3), per output channel (a block of 1 x in) or, as DeepSeek and Qwen publish fp8, 128 x 128 blocks;
- int4, groups of `group` inputs per scale (1 x 128 by default), two values per byte, symmetric or with a zero point.

int8 / fp8 weights also say whether activations are quantized per token on the fly (W8A8: the matmul runs in the 1-byte
type on the tensor cores, `rtpjax.quant.matmul`) or stay in the model's dtype (weight-only: the bytes read halve,
the FLOPs do not). Quantize-at-load choices are `METHODS`; pre-quantized checkpoints (`rtpjax.quant.checkpoints`) build
the same types. The embedding, the MoE router, norms and biases stay in the model's dtype: a small share of the bytes
and most of the accuracy risk (vLLM's fp8 leaves them too). So does the output head unless asked (`quantize_head`,
`--quantize-lm-head`): at batch 1 it is a large share of what a quantized model reads per token.

int4 packing (ours, chosen for the kernel): within each group of g inputs, byte j holds input j in its low nibble and
input j + g/2 in its high nibble, unsigned (0..15); the value is (nibble - zero) * scale, zero 8 when symmetric. The
kernel then multiplies each half group by its own nibbles without interleaving them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

STORAGE = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0), "int4": (jnp.uint8, 7.0)}
_QUANTIZED = re.compile(r"\.(attn\.w[qkvo]|mlp\.w_(gate|up|down)|moe\.w_(gate|up|down))$")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a weight is stored and multiplied: static, part of the compiled program.

    weight: "int8", "fp8" or "int4". act: activations quantized per token before the matmul ("int8", "fp8"; W8A8) or
    None (weight-only). group: inputs per scale (0: the whole row). block_rows: output rows per scale (1, or 128 for
    block-scaled fp8). symmetric: int4 without zero points. whole: the weight is whole on every device that holds it,
    so a GPU may run a Pallas kernel on it (under GSPMD a custom call would gather a sharded weight every step).
    decode_kernel: steps of at most this many tokens on a GPU take that kernel (`rtpjax.quant.small_matmul`); larger
    decode-sized steps, and all with 0, XLA's dot (`--quantized-decode`).
    """

    weight: str
    act: str | None = None
    group: int = 0
    block_rows: int = 1
    symmetric: bool = True
    whole: bool = False
    decode_kernel: int = 64  # all the kernel takes (small_matmul.MAX_ROWS; that module imports this one)

    @property
    def per_channel(self) -> bool:
        """One-byte weights with one scale per output channel: a scale that multiplies a dot's output columns."""
        return self.weight != "int4" and self.group == 0 and self.block_rows == 1

    def for_input(self, in_features: int) -> Scheme:
        """This scheme for a weight of `in_features` inputs: a group that does not divide them becomes the row."""
        if self.group and in_features % self.group:
            return dataclasses.replace(self, group=0)
        return self

    def group_size(self, in_features: int) -> int:
        return self.group or in_features


# Quantize-at-load choices (--quantization). fp8 / int8 are W8A8; the weight-only variants keep activations in the
# model's dtype (batch-1 decode gains the same, compute-bound steps pay a conversion instead of gaining).
METHODS = {
    "fp8": Scheme("fp8", act="fp8"),
    "int8": Scheme("int8", act="int8"),
    "fp8-weight-only": Scheme("fp8"),
    "int8-weight-only": Scheme("int8"),
    "int4": Scheme("int4", group=128),
    "int4-asym": Scheme("int4", group=128, symmetric=False),
}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale", "zero", "perm"],
                   meta_fields=["scheme"])  # fmt: skip
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """w ~= dequantize(self): q [..., out, in] (int4: [..., out, in/2] uint8), scale [..., out/block_rows, in/group]
    float32 (in/group is 1 per channel), zero [..., out, in/group] uint8 (asymmetric int4) or None, perm [in] int32 or
    None: the inputs' order of q's columns (GPTQ act-order), so the matmul reads x[..., perm]."""

    q: jax.Array
    scale: jax.Array
    scheme: Scheme
    zero: jax.Array | None = None
    perm: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's logical [..., out, in] shape."""
        *lead, cols = self.q.shape
        return (*lead, cols * (2 if self.scheme.weight == "int4" else 1))


def check_method(method: str | None) -> str | None:
    if method is not None and method not in METHODS:
        raise ValueError(f"quantization {method!r}: choose one of {', '.join(METHODS)} (or none)")
    return method


def is_quantized_param(path: str) -> bool:
    """Whether `path` (a dotted parameter path) is a weight that quantization replaces."""
    return bool(_QUANTIZED.search(path))


def _blocks(x: jax.Array, rows: int, group: int) -> jax.Array:
    """[..., out, in] -> [..., out/rows, rows, in/group, group]."""
    *lead, out, cols = x.shape
    return x.reshape(*lead, out // rows, rows, cols // group, group)


def _expand(s: jax.Array) -> jax.Array:
    """A per-block array [..., out/rows, in/group] -> [..., out/rows, 1, in/group, 1], to broadcast over `_blocks`."""
    return s[..., :, None, :, None]


def pack_int4(u: jax.Array, group: int) -> jax.Array:
    """Unsigned nibbles [..., out, in] (0..15) -> [..., out, in/2] uint8 in the module's layout."""
    *lead, out, cols = u.shape
    g = u.astype(jnp.uint8).reshape(*lead, out, cols // group, 2, group // 2)
    return (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*lead, out, cols // 2)


def unpack_int4(q: jax.Array, group: int) -> jax.Array:
    """Inverse of `pack_int4`: [..., out, in/2] uint8 -> [..., out, in] uint8 nibbles."""
    *lead, out, half = q.shape
    g = q.reshape(*lead, out, half * 2 // group, 1, group // 2)
    return jnp.concatenate([g & 15, g >> 4], axis=-2).reshape(*lead, out, half * 2)


def quantize(w: jax.Array, method: str | Scheme) -> QuantizedWeight:
    """Round-to-nearest quantization of a [..., out, in] weight by `method` (a METHODS name or a Scheme)."""
    scheme = (METHODS[method] if isinstance(method, str) else method).for_input(w.shape[-1])
    rows, group = scheme.block_rows, scheme.group_size(w.shape[-1])
    wb = _blocks(w.astype(jnp.float32), rows, group)
    dtype, largest = STORAGE[scheme.weight]
    if scheme.weight == "int4" and not scheme.symmetric:
        lo, hi = jnp.min(wb, axis=(-3, -1)), jnp.max(wb, axis=(-3, -1))
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # zero stays exact
        scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
        zero = jnp.clip(jnp.round(-lo / scale), 0, 15)
        u = jnp.clip(jnp.round(wb / _expand(scale)) + _expand(zero), 0, 15)
        u = u.reshape(w.shape)
        return QuantizedWeight(pack_int4(u, group), scale, scheme, zero=zero.astype(jnp.uint8))
    absmax = jnp.max(jnp.abs(wb), axis=(-3, -1))
    scale = jnp.where(absmax > 0, absmax / largest, 1.0)
    scaled = (wb / _expand(scale)).reshape(w.shape)
    if scheme.weight == "int4":
        return QuantizedWeight(pack_int4(jnp.clip(jnp.round(scaled), -8, 7) + 8, group), scale, scheme)
    q = jnp.round(scaled).astype(dtype) if jnp.issubdtype(dtype, jnp.integer) else scaled.astype(dtype)
    return QuantizedWeight(q, scale, scheme)


def quantize_head(params: dict, tied: bool, method: str, mesh=None) -> dict:
    """`params` with the output head quantized by `method` in its own sharding. A model that ties its head to the
    embedding gets a quantized copy as `lm_head` (the embedding stays for the token lookup; `decoder.logits` takes
    `lm_head` where there is one), made where the head lives: under pipeline stages (`mesh.mesh_of`) the last."""
    if check_method(method) is None:
        raise ValueError("quantizing the head takes a quantization method (--quantization)")
    head = params["embed"] if tied else params["lm_head"]
    if tied and hasattr(mesh, "mesh_of"):
        head = jax.device_put(head, NamedSharding(mesh.mesh_of("lm_head"), head.sharding.spec))
    return {**params, "lm_head": quantize_on_device(head, method)}


def values(w: QuantizedWeight) -> jax.Array:
    """The stored values as float32 before scaling ([..., out, in], q's column order): int4 nibbles less their zero."""
    if w.scheme.weight != "int4":
        return w.q.astype(jnp.float32)
    group = w.scheme.group_size(w.shape[-1])
    u = unpack_int4(w.q, group).astype(jnp.float32)
    zero = 8.0 if w.zero is None else jnp.repeat(w.zero.astype(jnp.float32), group, axis=-1)
    return u - zero


def dequantize(w: QuantizedWeight, dtype, stored_order: bool = False) -> jax.Array:
    """The weight in `dtype`, [..., out, in] in the inputs' own order (or q's column order: stored_order)."""
    rows, group = w.scheme.block_rows, w.scheme.group_size(w.shape[-1])
    full = (_blocks(values(w), rows, group) * _expand(w.scale)).reshape(w.shape)
    if w.perm is not None and not stored_order:
        full = jnp.take(full, jnp.argsort(w.perm), axis=-1)
    return full.astype(dtype)


def _fit(mesh, spec: tuple, shape: tuple) -> NamedSharding:
    """`spec` on `shape`, keeping a mesh axis only on a dimension it divides (a scale with one column stays whole)."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for axis, n in zip(spec, shape):
        names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        ways = math.prod(mesh.shape[a] for a in names)
        out.append(axis if n % ways == 0 else None)
    return NamedSharding(mesh, P(*out))


def weight_shardings(sharding, qw: QuantizedWeight) -> QuantizedWeight:
    """Shardings of a QuantizedWeight's arrays from its weight's sharding (each array follows its weight's axes)."""
    if not isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda _: sharding, qw)
    fit = functools.partial(_fit, sharding.mesh, tuple(sharding.spec))
    return QuantizedWeight(
        fit(qw.q.shape), fit(qw.scale.shape), qw.scheme,
        zero=None if qw.zero is None else fit(qw.zero.shape),
        perm=None if qw.perm is None else NamedSharding(sharding.mesh, P()),
    )  # fmt: skip


def placed(method: str | Scheme, sharding) -> Scheme:
    """The scheme of a weight quantized by `method` and placed with `sharding` (see Scheme.whole)."""
    scheme = METHODS[method] if isinstance(method, str) else method
    return dataclasses.replace(scheme, whole=sharding.is_fully_replicated)


def shape_struct(shape, sharding, method: str) -> QuantizedWeight:
    """The abstract QuantizedWeight of a weight: restore targets and compile-time shapes."""
    quant = functools.partial(quantize, method=placed(method, sharding))
    abstract = jax.eval_shape(quant, jax.ShapeDtypeStruct(shape, jnp.float32))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        weight_shardings(sharding, abstract))  # fmt: skip


@functools.cache
def quantizer(method: str, shape: tuple, sharding):
    """The jitted quantizer of [shape] weights placed with `sharding`, its outputs in their own shardings."""
    quant = functools.partial(quantize, method=placed(method, sharding))
    abstract = jax.eval_shape(quant, jax.ShapeDtypeStruct(shape, jnp.float32))
    return jax.jit(quant, out_shardings=weight_shardings(sharding, abstract))


def quantize_on_device(w: jax.Array, method: str) -> QuantizedWeight:
    """Quantize a placed weight into its own sharding (one compiled quantizer per method, shape and sharding)."""
    return quantizer(method, tuple(w.shape), w.sharding)(w)
