"""x @ W.T for int4 weights, dequantized in the kernel (Pallas, Triton lowering): decode reads 4 bits per weight.

A program owns a [block_m, block_n] tile of the output and walks the input axis one quantization group at a time: it
loads the group's packed bytes [block_n, g/2], splits their nibbles (low: the group's first half of inputs, high: the
second; see `rtpjax.loading.quantization`), subtracts the zero point, scales, and runs two tensor-core dots of depth
g/2 against the matching halves of x, accumulating in float32. Nothing is interleaved or reshaped in the kernel.

For decode-sized inputs (a few rows) the weight bytes are the whole cost, so the kernel is what pays; larger steps are
compute-bound and take XLA's dot of the dequantized weight (`rtpjax.quant.matmul`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_ROWS = 16  # tensor-core dots need 16 rows: fewer are padded


def _dot_t(a, b):
    """a @ b.T with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(x_ref, q_ref, s_ref, *rest, group: int, groups: int, symmetric: bool):
    z_ref, o_ref = (None, rest[0]) if symmetric else rest
    half = group // 2
    dtype = x_ref.dtype

    def body(k, acc):
        packed = q_ref[:, pl.ds(k * half, half)].astype(jnp.int32)  # [bn, g/2]
        scale = s_ref[:, pl.ds(k, 1)]  # [bn, 1]
        zero = 8.0 if symmetric else z_ref[:, pl.ds(k, 1)].astype(jnp.float32)
        lo = (((packed & 15).astype(jnp.float32) - zero) * scale).astype(dtype)
        hi = (((packed >> 4).astype(jnp.float32) - zero) * scale).astype(dtype)
        acc += _dot_t(x_ref[:, pl.ds(k * group, half)], lo)
        return acc + _dot_t(x_ref[:, pl.ds(k * group + half, half)], hi)

    acc = lax.fori_loop(0, groups, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def supported(rows: int, out: int, in_features: int, group: int) -> bool:
    """Shapes the kernel takes: a group of >= 32 inputs (two dots of >= 16) and an output a multiple of 16."""
    return group % 32 == 0 and in_features % group == 0 and out % 16 == 0 and rows >= 1


def _block_n(out: int, row_blocks: int) -> int:
    """The widest power-of-two tile (<= 128) dividing `out` that still gives ~a program per SM (132 on an H200)."""
    bn = 128
    while out % bn:
        bn //= 2
    while bn > 16 and row_blocks * (out // bn) < 132:
        bn //= 2
    return bn


@functools.partial(jax.jit, static_argnames=("group", "interpret", "num_warps", "num_stages"))
def int4_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, zero: jax.Array | None, *, group: int,
                interpret: bool = False, num_warps: int = 4, num_stages: int = 3) -> jax.Array:  # fmt: skip
    """x [M, K] times the int4 weight (q [N, K/2] uint8, scale [N, K/g] float32, zero [N, K/g] uint8 or None for
    symmetric) transposed: [M, N] in x's dtype."""
    rows, in_features = x.shape
    out = q.shape[0]
    if not supported(rows, out, in_features, group):
        raise ValueError(f"int4_matmul: group {group}, output {out} and input {in_features} need group % 32 == 0, "
                         "input % group == 0 and output % 16 == 0")  # fmt: skip
    bm = MIN_ROWS if rows <= MIN_ROWS else min(64, pl.next_power_of_2(rows))
    padded = pl.cdiv(rows, bm) * bm
    xp = jnp.pad(x, ((0, padded - rows), (0, 0)))
    bn = _block_n(out, padded // bm)
    groups = in_features // group
    in_specs = [
        pl.BlockSpec((bm, in_features), lambda i, j: (i, 0)),
        pl.BlockSpec((bn, in_features // 2), lambda i, j: (j, 0)),
        pl.BlockSpec((bn, groups), lambda i, j: (j, 0)),
    ]
    inputs = [xp, q, scale]
    if zero is not None:
        in_specs.append(pl.BlockSpec((bn, groups), lambda i, j: (j, 0)))
        inputs.append(zero)
    kernel = functools.partial(_kernel, group=group, groups=groups, symmetric=zero is None)
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    result = pl.pallas_call(
        kernel, grid=(padded // bm, out // bn), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((padded, out), x.dtype),
        compiler_params=params, interpret=interpret, name="int4_matmul",
    )(*inputs)  # fmt: skip
    return result[:rows]
