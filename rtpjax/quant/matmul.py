"""The one linear function every model matmul goes through: x [..., in] times a weight stored [out, in], plain or
quantized (`rtpjax.loading.quantization`).

- W8A8 (fp8 / int8 activations): x is quantized per token on the fly (symmetric, the KV cache's `quantize`) and the dot
  runs in the 1-byte type, accumulating in float32 (fp8) or int32 (int8); the token and channel scales multiply the
  accumulator afterwards, which is exact for per-channel weights. On a GPU XLA lowers the fp8 dot to cuBLASLt's fp8
  GEMM (the tensor cores' fp8 rate) and the int8 one to its s8 x s8 -> s32 GEMM. Block-scaled weights (128 x 128) take
  the activations per token and per 128 inputs (DeepSeek's 1 x 128) and one dot per input block, scaled and summed.
- Weight-only int8 / fp8 per channel: the 1-byte weight converts inside the GEMM (XLA fuses it), output columns scaled.
- int4 (and other grouped weights): XLA's dot of the weight dequantized to x's dtype, in x's dtype; on a GPU an int4
  weight is written out by `rtpjax.quant.int4_dequant`'s kernel (XLA's own unpacking runs far below bandwidth).
With RTPJAX_INT4_MOSAIC=1 (benchmarks, until it is measured), int4 steps of up to `int4_mosaic.MAX_ROWS` tokens past
decode size on a Hopper GPU take `rtpjax.quant.int4_mosaic`'s kernel instead (the nibbles dequantized in registers).
Decode-sized steps (at most `SMALL_ROWS` tokens) on a GPU skip all of that for per-channel one-byte and int4 weights:
`rtpjax.quant.small_matmul` streams the stored weight and converts it in registers, activations unquantized (at a few
rows the bytes read are the cost; quantizing the activations and setting up a scaled dot only add to it). With
`--quantized-decode xla` (Scheme.decode_kernel 0) they take the weight-only dot instead, W8A8 weights included,
so one engine option compares the two on the same weights; the default (auto) keeps the kernel for int4 and sends
one-byte steps there. Any one-row step on a GPU (`--one-row-decode`'s, or a draft model's) of a
per-channel one-byte weight takes XLA's row reduction instead of its dot (`row_reduce`; in the engine's fp8 step it
beat both XLA's dot of one row and the same dot padded to 16 rows: RESULTS.md, 2026-12-07e). Decode-sized steps
the kernel cannot take (a sharded weight) multiply weight-only too. Shapes are bucketed, so the choice is fixed per
compiled step.
Accumulation is float32 throughout: unscaled sums of 1-byte values overflow float16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from rtpjax.kernels.reference import quantize as quantize_rows
from rtpjax.loading.quantization import STORAGE, QuantizedWeight, dequantize
from rtpjax.quant import int4_dequant, int4_mosaic, small_matmul

SMALL_ROWS = small_matmul.MAX_ROWS  # steps of at most this many tokens take the small-M kernel on a GPU
AUTO_ROWS = {"int4": SMALL_ROWS}  # --quantized-decode auto: the kernel up to these rows, per weight format (else 0)


def linear(x: jax.Array, w: jax.Array | QuantizedWeight, backend: str | None = None) -> jax.Array:
    """x [..., in] @ w.T for w [out, in], in x's dtype. `backend`: the platform whose path to take (default JAX's)."""
    if not isinstance(w, QuantizedWeight):
        return x @ w.T
    backend = backend or jax.default_backend()
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if w.perm is not None:  # act-order checkpoints: q's columns are the inputs in this order
        x = jnp.take(x, w.perm, axis=-1)
    if uses_small_kernel(x.shape[0], w, backend):
        return small_matmul.quantized_matmul(x, w).reshape(*lead, -1)
    # decode-sized steps the kernel does not take (by choice, or a weight it cannot run) multiply as weight-only
    xla_decode = backend == "gpu" and x.shape[0] <= SMALL_ROWS
    if w.scheme.act is not None and not (xla_decode and w.scheme.per_channel):
        y = w8a8(x, w)
    elif w.scheme.per_channel and xla_decode and x.shape[0] == 1:
        y = row_reduce(x, w)
    elif w.scheme.per_channel:
        y = jnp.dot(x, w.q.T.astype(x.dtype), preferred_element_type=jnp.float32) * w.scale[:, 0]
    elif backend == "gpu" and int4_mosaic.routed(x, w):  # (opt-in: RTPJAX_INT4_MOSAIC=1)
        y = int4_mosaic.int4_matmul(x, w, interpret=jax.default_backend() == "cpu")
    else:  # the weight in x's dtype (on a GPU int4 by a kernel), then a 16-bit GEMM (accumulating in float32)
        gpu_int4 = backend == "gpu" and int4_dequant.applies(w)
        interpret = jax.default_backend() == "cpu"  # (tests ask for the GPU's path on the CPU)
        full = (int4_dequant.dequantize_int4(w, x.dtype, interpret=interpret) if gpu_int4
                else dequantize(w, x.dtype, stored_order=True))  # fmt: skip
        y = jnp.dot(x, full.T)
    return y.astype(x.dtype).reshape(*lead, -1)


def row_reduce(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """One row x [1, in] times a per-channel one-byte weight without a dot: the stored weight times the row, summed
    over the inputs in float32, which XLA emits as one row reduction reading the weight as stored (a padded GEMM
    tile does 16 times the work, and its operands pass through shared memory): float32 [1, out]."""
    return (jnp.sum(w.q.astype(jnp.float32) * x[0].astype(jnp.float32), axis=-1) * w.scale[:, 0])[None]


def _accumulator(act: str):
    return jnp.int32 if act == "int8" else jnp.float32


def w8a8(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [T, in] quantized per token (per token and input block for block-scaled weights), the dot in 1-byte types:
    float32 [T, out]."""
    scheme, act_dtype = w.scheme, STORAGE[w.scheme.act][0]
    rows, in_features = x.shape
    group = scheme.group_size(in_features)
    if group == in_features and scheme.block_rows == 1:
        xq, xs = quantize_rows(x, act_dtype)
        acc = jnp.dot(xq, w.q.T, preferred_element_type=_accumulator(scheme.act)).astype(jnp.float32)
        return acc * xs[:, None] * w.scale[:, 0]
    blocks = in_features // group
    xq, xs = quantize_rows(x.reshape(rows, blocks, group), act_dtype)  # [T, B, g], [T, B]
    qb = w.q.reshape(w.q.shape[0], blocks, group)
    ws = jnp.repeat(w.scale, scheme.block_rows, axis=0)  # [out, B]

    def block(acc, b):
        xb = lax.dynamic_index_in_dim(xq, b, axis=1, keepdims=False)
        wb = lax.dynamic_index_in_dim(qb, b, axis=1, keepdims=False)
        part = jnp.dot(xb, wb.T, preferred_element_type=_accumulator(scheme.act)).astype(jnp.float32)
        xsb = lax.dynamic_index_in_dim(xs, b, axis=1, keepdims=True)
        return acc + part * xsb * lax.dynamic_index_in_dim(ws, b, axis=1, keepdims=False), None

    acc, _ = lax.scan(block, jnp.zeros((rows, w.q.shape[0]), jnp.float32), jnp.arange(blocks))
    return acc


DECODE_CHOICES = ("auto", "pallas", "xla")


def decode_by(params, choice: str):
    """`params` with every quantized weight's decode-sized steps sent to `choice` ("pallas": the small-M kernel;
    "xla": XLA's dot, or its row reduction at one row; "auto": the kernel for int4, XLA for one-byte weights, each the
    faster in RESULTS.md's quantization runs): `--quantized-decode`, set once after loading (the scheme is static:
    part of the programs)."""
    if choice not in DECODE_CHOICES:
        raise ValueError(f"quantized_decode must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")

    def one(w):
        if not isinstance(w, QuantizedWeight):
            return w
        rows = {"pallas": SMALL_ROWS, "xla": 0}.get(choice, AUTO_ROWS.get(w.scheme.weight, 0))
        return dataclasses.replace(w, scheme=dataclasses.replace(w.scheme, decode_kernel=rows))

    return jax.tree.map(one, params, is_leaf=lambda v: isinstance(v, QuantizedWeight))


def uses_small_kernel(rows: int, w: QuantizedWeight, backend: str) -> bool:
    """Whether a step of `rows` tokens takes `small_matmul` for `w` (static: shapes are bucketed)."""
    return backend == "gpu" and rows <= min(SMALL_ROWS, w.scheme.decode_kernel) and small_matmul.applies(rows, w)
