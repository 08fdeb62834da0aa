"""Weight-only quantization, applied at load: int8 or fp8 (e4m3) linear weights with one scale per output channel.

Decode reads every weight once per step, so halving their bytes nearly halves its time at small batch. Weights are
quantized on the device right after their transfer (the host never holds a second copy), each in its own sharding.
The matmul reads the 1-byte weights (XLA fuses the conversion into the GEMM) and scales its output columns, which is
exact because the scale is per output channel. The embedding, the head, the MoE router, norms and biases stay in the
model's dtype: they are a small share of the bytes and most of the accuracy risk (vLLM's fp8 leaves them too).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

METHODS = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}  # storage dtype, largest magnitude
_QUANTIZED = re.compile(r"\.(attn\.w[qkvo]|mlp\.w_(gate|up|down)|moe\.w_(gate|up|down))$")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """w ~= q * scale[..., None]: q [..., out, in] in int8 / fp8, scale [..., out] float32."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape


def check_method(method: str | None) -> str | None:
    if method is not None and method not in METHODS:
        raise ValueError(f"quantization {method!r}: choose one of {', '.join(METHODS)} (or none)")
    return method


def is_quantized_param(path: str) -> bool:
    """Whether `path` (a dotted parameter path) is a weight that quantization replaces."""
    return bool(_QUANTIZED.search(path))


def quantize(w: jax.Array, method: str) -> QuantizedWeight:
    """Symmetric, per output channel (the last axis is the input one, as weights are stored [out, in])."""
    dtype, largest = METHODS[method]
    absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-1)
    scale = jnp.where(absmax > 0, absmax / largest, 1.0)
    scaled = w.astype(jnp.float32) / scale[..., None]
    q = jnp.round(scaled).astype(dtype) if jnp.issubdtype(dtype, jnp.integer) else scaled.astype(dtype)
    return QuantizedWeight(q, scale)


def dequantize(w: QuantizedWeight, dtype) -> jax.Array:
    return (w.q.astype(jnp.float32) * w.scale[..., None]).astype(dtype)


def scale_sharding(sharding):
    """The scale's sharding: the weight's without its input axis."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(sharding.spec) == 0)
        return NamedSharding(sharding.mesh, P(*spec[:-1]))
    return sharding


def shape_struct(shape, sharding, method: str) -> QuantizedWeight:
    """The abstract QuantizedWeight of a weight: restore targets and compile-time shapes."""
    return QuantizedWeight(
        jax.ShapeDtypeStruct(shape, METHODS[method][0], sharding=sharding),
        jax.ShapeDtypeStruct(shape[:-1], jnp.float32, sharding=scale_sharding(sharding)),
    )


@functools.cache
def quantizer(method: str, sharding):
    """The jitted quantizer of weights placed with `sharding`, keeping q and scale in that sharding."""
    out = QuantizedWeight(sharding, scale_sharding(sharding))
    return jax.jit(functools.partial(quantize, method=method), out_shardings=out)


def quantize_on_device(w: jax.Array, method: str) -> QuantizedWeight:
    """Quantize a placed weight into its own sharding (one compiled quantizer per method and sharding)."""
    return quantizer(method, w.sharding)(w)
