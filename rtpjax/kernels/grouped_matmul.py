"""Grouped matmul for MoE experts in Pallas (Triton lowering): each row tile multiplies its own expert's weights,
read in place from the expert stack in HBM (no gathered copy of them, as XLA's grouped path makes).

The rows come sorted by expert and padded per expert to whole tiles of `block_m` rows (`models.moe.sort_into_tiles`),
so tile i belongs to one expert, `tile_expert[i]` (-1: a spare tile past the last used one). A program owns one
[block_m, block_n] output tile: it reads its expert id, then walks the input axis `block_k` at a time, loading the
expert's [block_n, block_k] weight tile from a flat [E * N, K] view of the stack at row `expert * N + j * block_n`.
A spare tile's loop runs zero times, so it reads no weights and writes zeros: every output element is written.

Two kernels make the expert MLP: gate and up fused in one pass (two accumulators, SiLU(gate) * up on the way out), then
the down projection, each row scaled by its routing weight before the cast. At a few tokens the tiles times the output
blocks cannot fill the SMs (8 experts' tiles of 768 gate/up channels are 96 programs of 64): `split_k` > 1 splits
the input axis over a third grid axis, each split writing float32 partial sums that XLA adds up before SiLU, the
product and the scale. Dots accumulate in float32 (float32 inputs
at IEEE precision, not TF32); Triton's tensor-core dots need 16 rows, hence block_m >= 16.

Tiles of one row (`block_m` = 1) are the decode case: with a few tokens each (token, expert) assignment is its own
tile, in routing order, so nothing is sorted and no padding rows ride along; the row multiplies its weight tile on
the vector units (products and a row sum in float32, no tensor-core dot), so its output blocks may be narrower than
16 (ONE_ROW_MIN_N: more programs to spread one token's weight reads over the SMs). `one_row_sum` says when the
products are summed: "step" (each input block's, the default) or "end" (into a float32 accumulator of the weight
tile's shape, summed once: no reduction across threads inside the loop, more registers); on an H100 the best of each
were within a few percent of each other (RESULTS.md, 12-05c).

`fused_expert_mlp` runs one-row tiles' whole MLP as one kernel: a program takes `block_i` of its expert's intermediate
channels through gate and up, then multiplies them by the same columns of the down projection into a float32 partial
of the output, which XLA sums over the slices. It saves a launch and the second kernel's wait for the first, but on
an H100 it measured slower than the two kernels at one token (RESULTS.md, 12-05f): it reads the down projection by
column slices of its [H, I] stack, a few dozen bytes a row. The engine keeps the two kernels; benchmarks/moe_block.py
--pallas-fused-blocks measures it (a down stack stored [E, I, H] would let it read whole rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_BLOCK = 16  # tensor-core dots need every dimension >= 16
ONE_ROW_MIN_N = 4  # one-row tiles' narrowest output block (vector products: no tensor-core bound)
ONE_ROW_SUMS = ("step", "end")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dot_t(a, b, sum_rows: bool = True):
    """a @ b.T, float32 accumulation; float32 inputs at full precision. One row: products and a row sum, or the
    products [n, k] alone (`sum_rows` False: the caller sums them at the end)."""
    if a.shape[0] == 1:
        products = b.astype(jnp.float32) * a.astype(jnp.float32)
        return jnp.sum(products, axis=1)[None, :] if sum_rows else products
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)  # fmt: skip


def _finish(accs, scale, dtype):
    """float32 sums -> the output: SiLU(gate) * up for two, the rows' scales, the cast (in the kernel, or after a
    split-K's partial sums are added)."""
    out = accs[0] / (1.0 + jnp.exp(-accs[0])) * accs[1] if len(accs) == 2 else accs[0]
    if scale is not None:
        out = out * scale.astype(jnp.float32)[:, None]
    return out.astype(dtype)


def _kernel(expert_ref, x_ref, *refs, out_rows: int, block_n: int, block_k: int, steps: int, scaled: bool,
            partial: int, sum_at_end: bool):  # fmt: skip
    """One [block_m, block_n] tile of x @ W_e.T (two weights: SiLU(x @ G_e.T) * (x @ U_e.T)); refs: weights...,
    the rows' scales if `scaled`, the output. `partial` > 0: this program sums inputs of split program_id(2) only
    (x_ref holds just those) and writes each raw accumulator to an output of its own."""
    w_refs = list(refs[: len(refs) - max(partial, 1)])
    o_refs = refs[len(w_refs) :]
    scale_ref = w_refs.pop() if scaled else None
    expert = expert_ref[pl.program_id(0)]
    base = jnp.maximum(expert, 0) * out_rows + pl.program_id(1) * block_n
    first = pl.program_id(2) * (steps * block_k) if partial else 0  # this split's first input column
    sum_at_end = sum_at_end and x_ref.shape[0] == 1

    def body(s, accs):
        x = x_ref[:, pl.ds(s * block_k, block_k)]
        cols = pl.ds(first + s * block_k, block_k)
        return tuple(acc + _dot_t(x, w[pl.ds(base, block_n), cols], not sum_at_end) for acc, w in zip(accs, w_refs))

    shape = (block_n, block_k) if sum_at_end else o_refs[0].shape
    zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in w_refs)
    # Trip count `steps`, or 0 for a spare tile, in integer arithmetic: a bound derived from a bool lowers to an i1,
    # which Triton's scf.for rejects.
    trips = jnp.clip(expert + 1, 0, 1) * steps
    accs = lax.fori_loop(0, trips, body, zeros)
    if sum_at_end:
        accs = tuple(jnp.sum(acc, axis=1)[None, :] for acc in accs)
    if partial:
        for acc, o_ref in zip(accs, o_refs):
            o_ref[...] = acc
        return
    o_refs[0][...] = _finish(accs, None if scale_ref is None else scale_ref[...], o_refs[0].dtype)


def block_size(requested: int, dim: int, smallest: int = MIN_BLOCK) -> int:
    """The largest power of two dividing `dim` that is at most `requested` rounded up to a power of two (0 if under
    `smallest`: the kernel cannot take `dim`)."""
    b = min(pl.next_power_of_2(requested), pl.next_power_of_2(dim))
    while b >= smallest and dim % b:
        b //= 2
    return b if b >= smallest else 0


def unsupported(experts: int, inter: int, hidden: int, dtype) -> str | None:
    """Why the kernel cannot run `experts` experts of [inter, hidden] weights in `dtype`, or None when it can."""
    if experts * inter * hidden >= 2**31:  # Triton's pointer offsets into the flat stack are int32
        return f"a stack of {experts} x {inter} x {hidden} weights (2^31 elements or more)"
    if jnp.dtype(dtype) not in DTYPES:
        return f"expert weights of dtype {jnp.dtype(dtype)}"
    if inter % MIN_BLOCK or hidden % MIN_BLOCK:
        return f"expert dimensions {inter} x {hidden} (each must be a multiple of {MIN_BLOCK})"
    return None


def grouped_matmul(x, tile_expert, weights: tuple, scale=None, *, block_m: int, block_n: int = 64, block_k: int = 128,
                   num_warps: int = 4, num_stages: int = 3, split_k: int = 1, one_row_sum: str = "step",
                   x_repeat: int = 1, interpret: bool | None = None) -> jax.Array:  # fmt: skip
    """Rows x [n * block_m, K], tile i times its expert's weights ([E, N, K] each) transposed: [n * block_m, N] in x's
    dtype. Two weight stacks fuse gate and up: SiLU(x @ G.T) * (x @ U.T). `scale` [rows] multiplies each output row.
    `split_k`: programs per tile and output block, each over its share of the K inputs; `one_row_sum`: when one-row
    tiles sum their products (module docstring). `x_repeat` (one-row tiles): x holds every `x_repeat`-th row, tile i
    reading row i // x_repeat (a token's k assignments in routing order, without a repeated copy of x)."""
    depth = x.shape[1]
    rows = x.shape[0] * x_repeat
    experts, out, _ = weights[0].shape
    # one-row tiles take no tensor-core dot: their output blocks may be narrower (more programs at one token)
    bn = block_size(block_n, out, smallest=ONE_ROW_MIN_N if block_m == 1 else MIN_BLOCK)
    bk = block_size(block_k, depth)
    if 1 < block_m < MIN_BLOCK or rows % block_m or not (bn and bk) or tile_expert.shape != (rows // block_m,):
        raise ValueError(f"grouped_matmul: rows {rows} in tiles of {block_m} (1, or >= {MIN_BLOCK}) for "
                         f"{tile_expert.shape[0]} tile experts, weights {out} x {depth} "
                         f"(multiples of {MIN_BLOCK})")  # fmt: skip
    if x_repeat < 1 or (x_repeat > 1 and block_m != 1):
        raise ValueError(f"grouped_matmul: x_repeat {x_repeat} (>= 1, and more than 1 only for one-row tiles)")
    if one_row_sum not in ONE_ROW_SUMS:
        raise ValueError(f"grouped_matmul: one_row_sum {one_row_sum!r}: choose one of {', '.join(ONE_ROW_SUMS)}")
    if split_k < 1 or (depth // bk) % split_k:
        raise ValueError(f"grouped_matmul: split_k {split_k} must divide the {depth // bk} input blocks of {bk}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    flat = [w.reshape(experts * out, depth) for w in weights]  # free: the stacks are contiguous
    part = depth // split_k
    whole = pl.BlockSpec(flat[0].shape, lambda i, j, s: (0, 0))
    in_specs = [pl.BlockSpec(tile_expert.shape, lambda i, j, s: (0,)),
                pl.BlockSpec((block_m, part), lambda i, j, s: (i // x_repeat, s)), *[whole] * len(flat)]  # fmt: skip
    inputs = [tile_expert.astype(jnp.int32), x, *flat]
    split = split_k > 1
    if scale is not None and not split:
        in_specs.append(pl.BlockSpec((block_m,), lambda i, j, s: (i,)))
        inputs.append(scale)
    kernel = functools.partial(_kernel, out_rows=out, block_n=bn, block_k=bk, steps=part // bk,
                               scaled=scale is not None and not split, partial=len(flat) if split else 0,
                               sum_at_end=one_row_sum == "end")  # fmt: skip
    if split:  # per weight, float32 partial sums [split, rows, out]
        out_shape = [jax.ShapeDtypeStruct((split_k, rows, out), jnp.float32)] * len(flat)
        out_specs = [pl.BlockSpec((None, block_m, bn), lambda i, j, s: (s, i, j))] * len(flat)
    else:
        out_shape = jax.ShapeDtypeStruct((rows, out), x.dtype)
        out_specs = pl.BlockSpec((block_m, bn), lambda i, j, s: (i, j))
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    result = pl.pallas_call(
        kernel, grid=(rows // block_m, out // bn, split_k), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=params, interpret=interpret,
        name="grouped_glu" if len(flat) == 2 else "grouped_matmul",
    )(*inputs)  # fmt: skip
    if not split:
        return result
    return _finish([r.sum(0) for r in result], scale, x.dtype)


def expert_mlp(x, tile_expert, w_gate, w_up, w_down, scale, *, block_m: int, block_n: int = 64, block_k: int = 128,
               num_warps: int = 4, num_stages: int = 3, split_k: int = 1, one_row_sum: str = "step",
               x_repeat: int = 1, down: dict | None = None, interpret: bool | None = None) -> jax.Array:  # fmt: skip
    """scale * (SiLU(x @ G.T) * (x @ U.T)) @ D.T per tile with its expert's G, U [E, I, H] and D [E, H, I]
    (`x_repeat`: x's rows each serve that many consecutive one-row tiles, as grouped_matmul's). `down`: other
    block_n / block_k / num_warps / num_stages / split_k for the down projection (its inputs are the experts' width,
    its outputs the model's: another shape than gate and up)."""
    kw = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
              one_row_sum=one_row_sum, interpret=interpret)  # fmt: skip
    hidden = grouped_matmul(x, tile_expert, (w_gate, w_up), split_k=_fit_split(split_k, x.shape[1], block_k),
                            x_repeat=x_repeat, **kw)  # fmt: skip
    kw = {**kw, "split_k": split_k, **(down or {})}
    kw["split_k"] = _fit_split(kw["split_k"], w_down.shape[2], kw["block_k"])
    return grouped_matmul(hidden, tile_expert, (w_down,), scale, **kw)


def _fused_kernel(expert_ref, x_ref, g_ref, u_ref, d_ref, o_ref, *, inter: int, hidden: int, block_i: int,
                  block_k: int, block_h: int):  # fmt: skip
    """One one-row tile's slice of `block_i` intermediate channels of its expert's MLP, both projections in one
    program: h = SiLU(x @ G[slice].T) * (x @ U[slice].T), then that slice's share of the down projection, D[:, slice]
    @ h, a float32 partial [hidden] (XLA sums the slices). A spare tile (expert -1) reads no weights and writes
    zeros."""
    expert = expert_ref[pl.program_id(0)]
    e, first = jnp.maximum(expert, 0), pl.program_id(1) * block_i
    rows = pl.ds(e * inter + first, block_i)
    live = jnp.clip(expert + 1, 0, 1)  # (trip counts in integer arithmetic: Triton's loops reject an i1 bound)

    def up(c, accs):  # each step's products summed at once: [block_i] accumulators, few registers
        x = x_ref[:, pl.ds(c * block_k, block_k)].astype(jnp.float32)  # [1, block_k]
        cols = pl.ds(c * block_k, block_k)
        return tuple(acc + jnp.sum(w[rows, cols].astype(jnp.float32) * x, axis=1)
                     for acc, w in zip(accs, (g_ref, u_ref)))  # fmt: skip

    zeros = jnp.zeros((block_i,), jnp.float32)
    g, u = lax.fori_loop(0, live * (hidden // block_k), up, (zeros, zeros))
    h = (g / (1.0 + jnp.exp(-g)) * u)[None, :]  # [1, block_i]

    def down(c, carry):
        tile = d_ref[pl.ds(e * hidden + c * block_h, block_h), pl.ds(first, block_i)].astype(jnp.float32)
        o_ref[pl.ds(c * block_h, block_h)] = jnp.sum(tile * h, axis=1)
        return carry

    def spare(c, carry):
        o_ref[pl.ds(c * block_h, block_h)] = jnp.zeros((block_h,), jnp.float32)
        return carry

    lax.fori_loop(0, live * (hidden // block_h), down, 0)
    lax.fori_loop(0, (1 - live) * (hidden // block_h), spare, 0)


def fused_expert_mlp(x, tile_expert, w_gate, w_up, w_down, scale, *, block_i: int = 16, block_k: int = 512,
                     block_h: int = 256, num_warps: int = 4, num_stages: int = 3, x_repeat: int = 1,
                     interpret: bool | None = None) -> jax.Array:  # fmt: skip
    """`expert_mlp` for one-row tiles in one kernel (no second launch, no intermediate round trip): program (tile,
    slice) computes `block_i` intermediate channels and their share of the down projection; the slices' float32
    partials ([tiles, inter / block_i, hidden]: a decode step's few tiles) are summed and scaled by XLA, h kept in
    float32 (expert_mlp rounds it to x's dtype between its kernels). x [tiles / x_repeat, H] (tile i reads row i //
    x_repeat), scale [tiles]."""
    experts, inter, hidden = w_gate.shape
    tiles = x.shape[0] * max(x_repeat, 1)
    bi, bk, bh = block_size(block_i, inter, 1), block_size(block_k, hidden, 1), block_size(block_h, hidden, 1)
    problem = unsupported(experts, inter, hidden, w_gate.dtype)
    if (problem or x_repeat < 1 or x.shape[1] != hidden or w_up.shape != w_gate.shape
            or w_down.shape != (experts, hidden, inter) or tile_expert.shape != (tiles,) or scale.shape != (tiles,)):
        raise ValueError(f"fused_expert_mlp: x {x.shape} (x_repeat {x_repeat}), {tile_expert.shape[0]} tile experts "
                         f"and scale {scale.shape} for {tiles} one-row tiles; gate {w_gate.shape}, up {w_up.shape}, "
                         f"down {w_down.shape}" + (f"; {problem}" if problem else ""))  # fmt: skip
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    flat = [w_gate.reshape(-1, hidden), w_up.reshape(-1, hidden), w_down.reshape(-1, inter)]
    whole = [pl.BlockSpec(f.shape, lambda i, s: (0, 0)) for f in flat]
    kernel = functools.partial(_fused_kernel, inter=inter, hidden=hidden, block_i=bi, block_k=bk, block_h=bh)
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    partials = pl.pallas_call(
        kernel, grid=(tiles, inter // bi),
        in_specs=[pl.BlockSpec(tile_expert.shape, lambda i, s: (0,)),
                  pl.BlockSpec((1, hidden), lambda i, s: (i // x_repeat, 0)), *whole],
        out_specs=pl.BlockSpec((None, None, hidden), lambda i, s: (i, s, 0)),
        out_shape=jax.ShapeDtypeStruct((tiles, inter // bi, hidden), jnp.float32), compiler_params=params,
        interpret=interpret, name="fused_expert_mlp",
    )(tile_expert.astype(jnp.int32), x, *flat)  # fmt: skip
    return (partials.sum(1) * scale.astype(jnp.float32)[:, None]).astype(x.dtype)


def _fit_split(split_k: int, depth: int, block_k: int) -> int:
    """The largest split <= `split_k` dividing the input blocks (the two projections' inputs differ in length)."""
    bk = block_size(block_k, depth)
    if not bk:
        return 1  # no block fits: grouped_matmul says so
    return max(d for d in range(1, split_k + 1) if (depth // bk) % d == 0)
