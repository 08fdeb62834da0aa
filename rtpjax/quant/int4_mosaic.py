"""x @ W.T for an int4 weight on Hopper through the Mosaic GPU lowering (TMA + wgmma), for steps of 128-512 tokens:
the rows where `small_matmul`'s Triton tiles run below the tensor cores' rate and the dequantize-then-cuBLAS path
pays a 16-bit copy of the weight (RESULTS.md, 12-07e: int4 12-16% behind bf16 there).

The product is taken weights-first ("swap AB"): out.T [N, T] = W [N, K] @ x.T [K, T], so the weight tile is wgmma's
A operand, which may come from registers, where its nibbles become bfloat16 without a trip through shared memory;
the activations are B, straight from shared memory. Per program, 128 output channels (two compute warpgroups of 64,
wgmma's M) by TILE_T tokens; a producer warpgroup keeps `stages` groups of inputs in flight by TMA: each group's
packed bytes [128, 64], its two halves of x [TILE_T, 64] (the layout puts input j in a byte's low nibble and j + 64
in its high one, `rtpjax.loading.quantization`, so each half is one dot with nothing interleaved), and the group's
scales and zeros for the 128 channels. A compute warpgroup turns each half's nibbles into (nibble - zero) * scale in
float32, rounded to bfloat16 (the reference dequantization's values exactly), and accumulates both dots in float32.
The wrapper pads the tokens to whole tiles and transposes the result back (JAX 0.10.2's Mosaic GPU cannot store a
register tile transposed into swizzled shared memory; XLA may fuse the transpose into the next op).

Groups of 128 inputs only (the engine's default int4 scheme), channels a multiple of 128. `linear` sends steps past
small_matmul's rows and up to MAX_ROWS tokens here only with RTPJAX_INT4_MOSAIC=1 (read at import), until it is
measured: `benchmarks/kernels/quant_bench.py --tokens` times it beside the other paths on a GPU. JAX 0.10.2's Mosaic GPU
interpreter (the CPU tests) has no register layouts or wgmma, so there the dots are plain dots of the dequantized
registers and the shared-memory tiles; copies, barriers, slots and the dequantization are the same code.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from rtpjax.kernels import ptx
from rtpjax.loading.quantization import QuantizedWeight
from rtpjax.quant import small_matmul

GROUP = 128  # inputs per group (scale and zero): two wgmma K steps of HALF
HALF = GROUP // 2
ROWS = 64  # output channels per compute warpgroup (wgmma M)
TILE_N = 2 * ROWS  # output channels per program
TILE_T = 128  # tokens per program (wgmma N)
MAX_ROWS = 512  # past this many tokens a step is compute-bound: the dequantized weight and cuBLAS's GEMM
ENABLED = os.environ.get("RTPJAX_INT4_MOSAIC", "0") == "1"  # `routed`: benchmarks opt in until it is measured
X_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 bf16 = 128-byte rows
W_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(64))  # 64 packed bytes a row


def available() -> bool:
    """On a Hopper GPU (wgmma and TMA as this kernel uses them)."""
    cc = ptx.compute_capability()
    return cc is not None and cc[0] == 9


def applies(x_rows: int, w: QuantizedWeight) -> bool:
    """Whether the kernel takes `w` (2-D int4, groups of 128, whole on the device, channels % 128 == 0) for a step
    of `x_rows` tokens (padded to whole tiles of TILE_T)."""
    s = w.scheme
    if s.weight != "int4" or not s.whole or w.q.ndim != 2 or w.perm is not None or x_rows < 1:
        return False
    out, in_features = w.shape
    return s.group_size(in_features) == GROUP and in_features % GROUP == 0 and out % TILE_N == 0


def routed(x: jax.Array, w: QuantizedWeight) -> bool:
    """Whether `linear` sends x [T, K] @ w here: opted in (ENABLED), a Hopper GPU, bfloat16 x of more than a decode
    step's rows and at most MAX_ROWS, a weight the kernel takes (static: shapes are bucketed)."""
    rows = x.shape[0]
    return (ENABLED and small_matmul.MAX_ROWS < rows <= MAX_ROWS and x.dtype == jnp.bfloat16 and available()
            and applies(rows, w))  # fmt: skip


def int4_matmul(x: jax.Array, w: QuantizedWeight, *, stages: int = 3, interpret: bool = False) -> jax.Array:
    """x [T, K] (bfloat16) @ dequantize(w).T -> [T, N] bfloat16 (`applies` must hold)."""
    if not applies(x.shape[0], w) or x.dtype != jnp.bfloat16 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"int4_matmul: x {x.dtype}{list(x.shape)}, weight {w.shape} ({w.scheme.weight}, group "
                         f"{w.scheme.group_size(w.shape[-1])}): need bfloat16 x [T, K], a 2-D int4 weight whole on "
                         f"the device, groups of {GROUP}, output channels % {TILE_N} == 0, no act-order")  # fmt: skip
    tokens = x.shape[0]
    padded = -(-tokens // TILE_T) * TILE_T
    x = jnp.pad(x, ((0, padded - tokens), (0, 0)))
    scale_t = w.scale.T.astype(jnp.float32)  # [G, N]: a group's scales for a tile's channels are one row
    zero_t = jnp.full_like(scale_t, 8.0) if w.zero is None else w.zero.T.astype(jnp.float32)
    out_t = _call(w.shape[0], w.shape[1], padded, stages, interpret)(x, w.q, scale_t, zero_t)
    return out_t.T[:tokens]


@functools.lru_cache(maxsize=None)
def _call(out: int, in_features: int, tokens: int, stages: int, interpret: bool):
    groups = in_features // GROUP
    kernel, scratch = _kernel(groups, stages, interpret)
    params = dict(compiler_params=plgpu.CompilerParams(approx_math=True))
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params = dict(interpret=InterpretGPUParams(detect_races=True))
    return plgpu.kernel(lambda *refs: pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg"),
                        out_type=jax.ShapeDtypeStruct((out, tokens), jnp.bfloat16),
                        grid=(out // TILE_N, tokens // TILE_T), grid_names=("n", "t"), num_threads=3,
                        thread_name="wg", **params)  # fmt: skip


def _gpu_forms(interpret: bool):
    """What differs between the GPU lowering and the interpreter (same math): packed(ref), a [ROWS, HALF] byte tile in
    registers (on the GPU in wgmma's operand layout, so what is computed from it feeds the wgmma as it is);
    rows(ref, idx), a [ROWS] vector broadcast over such a tile's columns; initial(), the accumulator; dots(acc, lo,
    hi, x_lo, x_hi) = acc + lo @ x_lo.T + hi @ x_hi.T, the weight halves in registers, x's halves in shared memory (on
    the GPU: wgmma, waited for, so x's slot may be released after it)."""
    shape = (ROWS, HALF)
    if interpret:

        def dots(acc, lo, hi, x_lo, x_hi):
            dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
            return acc + dot(lo, x_lo[...].T) + dot(hi, x_hi[...].T)

        return (lambda ref: ref[...], lambda ref, idx: lax.broadcast_in_dim(ref[idx], shape, [0]),
                lambda: jnp.zeros((ROWS, TILE_T), jnp.float32), dots)  # fmt: skip

    def packed(ref):
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=False)

    def rows(ref, idx):
        return lax.broadcast_in_dim(plgpu.load(ref, idx, layout=plgpu.Layout.WGMMA.reduce(1)), shape, [0])

    def initial():
        return plgpu.layout_cast(jnp.zeros((ROWS, TILE_T), jnp.float32), plgpu.Layout.WGMMA)

    def dots(acc, lo, hi, x_lo, x_hi):
        def both(acc_ref):
            plgpu.wgmma(acc_ref, lo, x_lo.transpose((1, 0)))
            plgpu.wgmma(acc_ref, hi, x_hi.transpose((1, 0)))
            plgpu.wgmma_wait(0)

        return pl.run_state(both)(plgpu.ACC.init(acc))

    return packed, rows, initial, dots


def _kernel(groups: int, stages: int, interpret: bool):
    """Per (128 output channels, TILE_T tokens): compute warpgroups 0 and 1 (64 channels each), producer 2."""
    packed_tile, rows, initial, dots = _gpu_forms(interpret)

    def kernel(x_ref, q_ref, s_ref, z_ref, out_ref, w_smem, x_smem, s_smem, z_smem, out_smem, ready, free):
        wg = lax.axis_index("wg")
        n0 = pl.multiple_of(lax.axis_index("n") * TILE_N, TILE_N)
        t0 = pl.multiple_of(lax.axis_index("t") * TILE_T, TILE_T)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            mine = pl.ds(pl.multiple_of(wg * ROWS, ROWS), ROWS)

            def group(g, acc):
                slot = lax.rem(g, jnp.int32(stages))
                plgpu.barrier_wait(ready.at[slot])
                packed = packed_tile(w_smem.at[slot, wg]).astype(jnp.int32)  # [ROWS, HALF] bytes (no 8-bit shifts)
                zero, scale = rows(z_smem.at[slot], (mine,)), rows(s_smem.at[slot], (mine,))
                lo = ((packed & 15).astype(jnp.float32) - zero) * scale
                hi = ((packed >> 4).astype(jnp.float32) - zero) * scale
                acc = dots(acc, lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16), x_smem.at[slot, 0],
                           x_smem.at[slot, 1])  # fmt: skip
                plgpu.barrier_arrive(free.at[slot])
                return acc

            acc = lax.fori_loop(0, groups, group, initial())
            out_smem[wg] = acc.astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[pl.ds(n0 + wg * ROWS, ROWS), pl.ds(t0, TILE_T)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(g, _):
                slot = lax.rem(g, jnp.int32(stages))

                @pl.when(g >= stages)  # the slot's previous group has been read by both compute warpgroups
                def _():
                    plgpu.barrier_wait(free.at[slot])

                bar = ready.at[slot]
                for w in range(2):  # each compute warpgroup's channels
                    src = q_ref.at[pl.ds(n0 + w * ROWS, ROWS), pl.ds(g * HALF, HALF)]
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot, w], bar)
                for half in range(2):
                    src = x_ref.at[pl.ds(t0, TILE_T), pl.ds(g * GROUP + half * HALF, HALF)]
                    plgpu.copy_gmem_to_smem(src, x_smem.at[slot, half], bar)
                plgpu.copy_gmem_to_smem(s_ref.at[g, pl.ds(n0, TILE_N)], s_smem.at[slot], bar)
                plgpu.copy_gmem_to_smem(z_ref.at[g, pl.ds(n0, TILE_N)], z_smem.at[slot], bar)

            lax.fori_loop(0, groups, fetch, None)

            def drain(g, _):  # the last groups' releases: every barrier phase is seen by every waiter
                plgpu.barrier_wait(free.at[lax.rem(g, jnp.int32(stages))])

            lax.fori_loop(max(groups - stages, 0), groups, drain, None)

    scratch = (plgpu.SMEM((stages, 2, ROWS, HALF), jnp.uint8, transforms=W_TILED),
               plgpu.SMEM((stages, 2, TILE_T, HALF), jnp.bfloat16, transforms=X_TILED),
               plgpu.SMEM((stages, TILE_N), jnp.float32), plgpu.SMEM((stages, TILE_N), jnp.float32),
               plgpu.SMEM((2, ROWS, TILE_T), jnp.bfloat16, transforms=X_TILED),
               plgpu.Barrier(num_arrivals=6, num_barriers=stages),  # six copies land a group
               plgpu.Barrier(num_arrivals=2, num_barriers=stages))  # both compute warpgroups release it
    return kernel, scratch
