"""x @ W.T for an int4 weight on Hopper through the Mosaic GPU lowering (TMA + wgmma), for steps of 65-512 tokens
(padded to tiles of 128): the rows where `small_matmul`'s Triton tiles run below the tensor cores' rate and the
dequantize-then-cuBLAS path pays a 16-bit copy of the weight (RESULTS.md, 12-07e: int4 12-16% behind bf16 there).

The product is taken weights-first ("swap AB"): out.T [N, T] = W [N, K] @ x.T [K, T], so the weight tile is wgmma's
A operand, which may come from registers, where its nibbles become bfloat16 without a trip through shared memory;
the activations are B, straight from shared memory. Per program, 128 output channels (two compute warpgroups of 64,
wgmma's M) by TILE_T tokens; a producer warpgroup keeps `stages` groups of inputs in flight by TMA: each group's
packed bytes [128, 64], its two halves of x [TILE_T, 64] (the layout puts input j in a byte's low nibble and j + 64
in its high one, `rtpjax.loading.quantization`, so each half is one dot with nothing interleaved), and the group's
scales (and zeros, when asymmetric) for the 128 channels. A compute warpgroup turns each half's nibbles into
(nibble - zero) * scale in float32, rounded to bfloat16 (the reference dequantization's values exactly), and
accumulates both dots in float32. Layers with few output channels (4,096 at 128 tokens: 32 programs) split the
inputs' groups over several programs (`splits_for`), each writing a float32 partial that XLA sums. The wrapper pads
the tokens to whole tiles and transposes the result back (JAX 0.10.2's Mosaic GPU cannot store a register tile
transposed into swizzled shared memory; XLA may fuse the transpose into the next op).

Groups of 128 inputs only (the engine's default int4 scheme), channels a multiple of 128. `linear` sends steps past
small_matmul's rows and up to MAX_ROWS tokens here only with RTPJAX_INT4_MOSAIC=1 (read at import: every process of
a multi-host engine needs the same value), until it is measured: `benchmarks/kernels/quant_bench.py --mosaic` times
it beside the other paths on a GPU. JAX 0.10.2's Mosaic GPU interpreter (the CPU tests) has no register layouts or
wgmma, so there the dots are plain dots of the dequantized registers and the shared-memory tiles; copies, barriers,
slots and the dequantization are the same code.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from rtpjax.kernels import SMS, ptx
from rtpjax.loading.quantization import QuantizedWeight
from rtpjax.quant import small_matmul

GROUP = 128  # inputs per group (scale and zero): two wgmma K steps of HALF
HALF = GROUP // 2
ROWS = 64  # output channels per compute warpgroup (wgmma M)
TILE_N = 2 * ROWS  # output channels per program
TILE_T = 128  # tokens per program (wgmma N)
MAX_SPLITS = 8  # input splits at most (narrow layers: too few programs for the SMs otherwise)
MAX_ROWS = 512  # past this many tokens a step is compute-bound: the dequantized weight and cuBLAS's GEMM
ENABLED = os.environ.get("RTPJAX_INT4_MOSAIC", "0") == "1"  # `routed`: benchmarks opt in until it is measured
BF16_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 bf16 = 128-byte rows
F32_TILED = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))  # 32 float32 = 128-byte rows
W_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(64))  # 64 packed bytes a row


def available() -> bool:
    """On a Hopper GPU (wgmma and TMA as this kernel uses them)."""
    cc = ptx.compute_capability()
    return cc is not None and cc[0] == 9


def applies(x_rows: int, w: QuantizedWeight) -> bool:
    """Whether the kernel takes `w` (2-D int4, groups of 128, whole on the device, channels % 128 == 0) for a step
    of `x_rows` tokens (padded to whole tiles of TILE_T). An act-order weight's inputs are q's columns: the caller
    permutes x (`linear` does)."""
    s = w.scheme
    if s.weight != "int4" or not s.whole or w.q.ndim != 2 or x_rows < 1:
        return False
    out, in_features = w.shape
    return s.group_size(in_features) == GROUP and in_features % GROUP == 0 and out % TILE_N == 0


def routed(x: jax.Array, w: QuantizedWeight) -> bool:
    """Whether `linear` sends x [T, K] @ w here: opted in (ENABLED), a Hopper GPU, bfloat16 x of more than a decode
    step's rows and at most MAX_ROWS, a weight the kernel takes (static: shapes are bucketed)."""
    rows = x.shape[0]
    return (ENABLED and small_matmul.MAX_ROWS < rows <= MAX_ROWS and x.dtype == jnp.bfloat16 and available()
            and applies(rows, w))  # fmt: skip


def splits_for(out: int, tokens: int, groups: int, sms: int = SMS) -> int:
    """Input splits: the fewest (a divisor of the groups, at most MAX_SPLITS) that give every SM a program."""
    programs = (out // TILE_N) * -(-tokens // TILE_T)
    fits = [d for d in range(1, MAX_SPLITS + 1) if groups % d == 0]
    return next((d for d in fits if programs * d >= sms), fits[-1])


def int4_matmul(x: jax.Array, w: QuantizedWeight, *, stages: int = 3, splits: int = 0,
                interpret: bool = False) -> jax.Array:  # fmt: skip
    """x [T, K] (bfloat16, in q's column order) @ dequantize(w).T -> [T, N] bfloat16 (`applies` must hold).
    splits: the inputs' groups split that many ways, each a float32 partial that XLA sums (0: `splits_for`)."""
    groups = x.shape[-1] // GROUP
    if not applies(x.shape[0], w) or x.dtype != jnp.bfloat16 or x.ndim != 2 or x.shape[1] != w.shape[1] \
            or splits < 0 or (splits and groups % splits):  # fmt: skip
        raise ValueError(f"int4_matmul: x {x.dtype}{list(x.shape)}, weight {w.shape} ({w.scheme.weight}, group "
                         f"{w.scheme.group_size(w.shape[-1])}), {splits} splits: need bfloat16 x [T, K], a 2-D int4 "
                         f"weight whole on the device, groups of {GROUP}, output channels % {TILE_N} == 0, splits "
                         f"dividing the {groups} groups")  # fmt: skip
    tokens, out = x.shape[0], w.shape[0]
    padded = -(-tokens // TILE_T) * TILE_T
    splits = splits or splits_for(out, padded, groups)
    x = jnp.pad(x, ((0, padded - tokens), (0, 0)))
    scales = [w.scale.T.astype(jnp.float32)]  # [G, N]: a group's scales for a tile's channels are one row
    if w.zero is not None:
        scales.append(w.zero.T.astype(jnp.float32))
    out_t = _call(out, w.shape[1], padded, stages, splits, w.zero is None, interpret)(x, w.q, *scales)
    if splits > 1:
        out_t = out_t.sum(axis=0).astype(jnp.bfloat16)
    return out_t.T[:tokens]


@functools.lru_cache(maxsize=None)
def _call(out: int, in_features: int, tokens: int, stages: int, splits: int, symmetric: bool, interpret: bool):
    kernel, scratch = _kernel(in_features // GROUP // splits, stages, splits > 1, symmetric, interpret)
    params = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params = dict(interpret=InterpretGPUParams(detect_races=True))
    shape = (out // TILE_N, splits, tokens // TILE_T)  # the last axis varies fastest: token tiles share weights in L2
    out_type = (jax.ShapeDtypeStruct((splits, out, tokens), jnp.float32) if splits > 1
                else jax.ShapeDtypeStruct((out, tokens), jnp.bfloat16))  # fmt: skip
    return plgpu.kernel(lambda *refs: pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg"),
                        out_type=out_type, grid=shape, grid_names=("n", "k", "t"), num_threads=3, thread_name="wg",
                        **params)  # fmt: skip


class _Forms(NamedTuple):
    """What differs between the GPU lowering and the interpreter (same math)."""

    packed: Callable  # packed(ref): a [ROWS, HALF] byte tile in registers (on the GPU in wgmma's operand layout)
    rows: Callable  # rows(ref, idx): a [ROWS] vector broadcast over such a tile's columns
    # accumulate(step, groups, done): acc = step(g, acc) for g in range(groups) from a float32 zero [ROWS, TILE_T],
    # then done(acc's value). On the GPU acc is a wgmma accumulator in registers (a scoped ACC ref the loop closes
    # over: JAX 0.11.2 cannot lower one carried through the loop by run_state), in the interpreter the loop's carry.
    accumulate: Callable
    # dots(acc, lo, hi, x_lo, x_hi) -> acc + lo @ x_lo.T + hi @ x_hi.T: the weight halves in registers, x's halves
    # in shared memory (on the GPU wgmmas, waited for, so x's slot may be released after it)
    dots: Callable


def _forms(interpret: bool) -> _Forms:
    shape = (ROWS, HALF)
    if interpret:

        def dots(acc, lo, hi, x_lo, x_hi):
            dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
            return acc + dot(lo, x_lo[...].T) + dot(hi, x_hi[...].T)

        def accumulate(step, groups, done):
            done(lax.fori_loop(0, groups, step, jnp.zeros((ROWS, TILE_T), jnp.float32)))

        return _Forms(lambda ref: ref[...], lambda ref, idx: lax.broadcast_in_dim(ref[idx], shape, [0]), accumulate,
                      dots)  # fmt: skip

    def packed(ref):
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=False)

    def rows(ref, idx):
        return lax.broadcast_in_dim(plgpu.load(ref, idx, layout=plgpu.Layout.WGMMA.reduce(1)), shape, [0])

    def accumulate(step, groups, done):
        def scope(acc_ref):  # (an ACC starts at zero)
            def body(g, _):
                step(g, acc_ref)

            lax.fori_loop(0, groups, body, None)
            done(acc_ref[...])

        pl.run_scoped(scope, plgpu.ACC((ROWS, TILE_T), jnp.float32))

    def dots(acc_ref, lo, hi, x_lo, x_hi):
        plgpu.wgmma(acc_ref, lo, x_lo.transpose((1, 0)))
        plgpu.wgmma(acc_ref, hi, x_hi.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref

    return _Forms(packed, rows, accumulate, dots)


def _kernel(groups: int, stages: int, partial: bool, symmetric: bool, interpret: bool):
    """Per (TILE_T tokens, 128 output channels, split of `groups` groups): compute warpgroups 0 and 1 (64 channels
    each), producer 2. partial: the result is a float32 partial sum (one split of several), else bfloat16.
    symmetric: every zero point is 8 (no zeros to copy)."""
    forms = _forms(interpret)
    copies = 5 if symmetric else 6  # landing each group: two weight tiles, two halves of x, scales (and zeros)

    def kernel(x_ref, q_ref, s_ref, *rest):
        z_ref = None if symmetric else rest[0]
        out_ref, w_smem, x_smem, s_smem, z_smem, out_smem, ready, free = rest[0 if symmetric else 1 :]
        wg, split = lax.axis_index("wg"), lax.axis_index("k")
        n0 = pl.multiple_of(lax.axis_index("n") * TILE_N, TILE_N)
        t0 = pl.multiple_of(lax.axis_index("t") * TILE_T, TILE_T)
        first = split * groups  # this program's first group

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            mine = pl.ds(pl.multiple_of(wg * ROWS, ROWS), ROWS)

            def group(g, acc):
                slot = lax.rem(g, jnp.int32(stages))
                plgpu.barrier_wait(ready.at[slot])
                packed = forms.packed(w_smem.at[slot, wg]).astype(jnp.int32)  # [ROWS, HALF] bytes (no 8-bit shifts)
                zero = 8.0 if symmetric else forms.rows(z_smem.at[slot], (mine,))
                scale = forms.rows(s_smem.at[slot], (mine,))
                lo = ((packed & 15).astype(jnp.float32) - zero) * scale
                hi = ((packed >> 4).astype(jnp.float32) - zero) * scale
                acc = forms.dots(acc, lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16), x_smem.at[slot, 0],
                                 x_smem.at[slot, 1])  # fmt: skip
                plgpu.barrier_arrive(free.at[slot])
                return acc

            def store(acc):
                out_smem[wg] = acc.astype(out_smem.dtype)
                plgpu.commit_smem()
                dst = out_ref.at[split] if partial else out_ref
                plgpu.copy_smem_to_gmem(out_smem.at[wg], dst.at[pl.ds(n0 + wg * ROWS, ROWS), pl.ds(t0, TILE_T)])
                plgpu.wait_smem_to_gmem(0)

            forms.accumulate(group, groups, store)

        @pl.when(wg == 2)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(g, _):
                slot, at = lax.rem(g, jnp.int32(stages)), first + g

                @pl.when(g >= stages)  # the slot's previous group has been read by both compute warpgroups
                def _():
                    plgpu.barrier_wait(free.at[slot])

                bar = ready.at[slot]
                for consumer in range(2):  # each compute warpgroup's channels
                    src = q_ref.at[pl.ds(n0 + consumer * ROWS, ROWS), pl.ds(at * HALF, HALF)]
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot, consumer], bar)
                for half in range(2):
                    src = x_ref.at[pl.ds(t0, TILE_T), pl.ds(at * GROUP + half * HALF, HALF)]
                    plgpu.copy_gmem_to_smem(src, x_smem.at[slot, half], bar)
                plgpu.copy_gmem_to_smem(s_ref.at[at, pl.ds(n0, TILE_N)], s_smem.at[slot], bar)
                if not symmetric:
                    plgpu.copy_gmem_to_smem(z_ref.at[at, pl.ds(n0, TILE_N)], z_smem.at[slot], bar)

            lax.fori_loop(0, groups, fetch, None)

            def drain(g, _):  # the last groups' releases: every barrier phase is seen by every waiter
                plgpu.barrier_wait(free.at[lax.rem(g, jnp.int32(stages))])

            lax.fori_loop(max(groups - stages, 0), groups, drain, None)

    out_dtype, out_tiles = (jnp.float32, F32_TILED) if partial else (jnp.bfloat16, BF16_TILED)
    scratch = (plgpu.SMEM((stages, 2, ROWS, HALF), jnp.uint8, transforms=W_TILED),
               plgpu.SMEM((stages, 2, TILE_T, HALF), jnp.bfloat16, transforms=BF16_TILED),
               plgpu.SMEM((stages, TILE_N), jnp.float32), plgpu.SMEM((stages, TILE_N), jnp.float32),
               plgpu.SMEM((2, ROWS, TILE_T), out_dtype, transforms=out_tiles),
               plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
               plgpu.Barrier(num_arrivals=2, num_barriers=stages))  # both compute warpgroups release a slot
    return kernel, scratch
