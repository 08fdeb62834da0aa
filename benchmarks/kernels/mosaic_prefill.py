"""Prefill attention over a paged KV cache with the Mosaic GPU lowering (wgmma + TMA, Hopper): the candidate for
issue 4's prefill goal. JAX's own dense Mosaic GPU attention reaches 491 TFLOP/s at that shape on an H200, the
Triton-lowered kernel 256 (benchmarks/RESULTS.md); this is a prototype beside the engine's kernel, not wired into it.

Written so JAX 0.10.2's Mosaic GPU interpreter runs it on CPU, where the tests compare it with the plain-jnp
reference: K pages are stored transposed ([head_dim, page]) so TMA brings K^T tiles as the first wgmma's B operand
(the interpreter has no transposed views), the probabilities reach the second wgmma through shared memory, and the
accumulators are scoped (no `run_state`). One page of 64 tokens is one KV tile. Two forms: `paged_prefill`, one
warpgroup per (query head, 64-query tile) with copies and math in sequence, and `paged_prefill_pipelined`, split as
JAX's dense kernel is (two compute warpgroups and a producer keeping pages in flight). Neither has run on a GPU yet.

    python -m rtpjax.benchmarks.kernels.mosaic_prefill --tokens 4096 [--pipelined]    # on a Hopper GPU
    python -m rtpjax.benchmarks.kernels.mosaic_prefill --tokens 128 --interpret         # anywhere, slowly
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

PAGE = 64  # tokens per page = per KV tile: 64 x 2 bytes is one 128-byte swizzle row of a transposed K page
BLOCK_Q = 64  # queries per warpgroup: the wgmma M


def _check(q, k_pages_t, v_pages, block_table, context, queries_per_program: int):
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_pages_t.shape[0]
    if tokens % queries_per_program or q_heads % kv_heads or k_pages_t.shape[2:] != (head_dim, PAGE):
        raise ValueError(f"tokens {tokens} must be a multiple of {queries_per_program}, query heads {q_heads} of KV "
                         f"heads {kv_heads}, and K pages [Hkv, pages, {head_dim}, {PAGE}]; got {k_pages_t.shape}")
    if v_pages.shape != (kv_heads, k_pages_t.shape[1], PAGE, head_dim) or head_dim % 64:
        raise ValueError(f"V pages must be [Hkv, pages, {PAGE}, head_dim] with head_dim a multiple of 64")
    if block_table.shape[0] % 4 or context.shape != (4,):
        raise ValueError("block_table length must be a multiple of 4 and context an int32 [4]")


def _layouts(interpret: bool):
    """Register layouts are hints for the GPU lowering; the interpreter has no rule for them (the values are the same).
    Returns (layout_cast, iota over a [BLOCK_Q, PAGE] tile, the initial accumulator, max and sum)."""
    if interpret:
        cast = lambda x, layout: x  # noqa: E731
        iota = lambda dim: lax.broadcasted_iota(jnp.int32, (BLOCK_Q, PAGE), dim)  # noqa: E731
    else:
        cast, tile = plgpu.layout_cast, plgpu.Layout.WGMMA
        iota = lambda dim: plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, PAGE), dim, layout=tile)  # noqa: E731

    def initial(head_dim):
        tile, row = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
        acc = cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), tile)
        m, l = jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), jnp.zeros((BLOCK_Q,), jnp.float32)
        return acc, cast(m, row), cast(l, row)

    return iota, initial


def _attend(carry, j, first_position, q_smem, kt_slot, v_slot, p_smem, *, scale, iota, wait_v, scores_done):
    """One KV tile of online softmax for a 64-query tile whose first query sits at `first_position`: scores
    (wgmma), causal mask, running max and sum, probabilities through shared memory, values (wgmma)."""
    acc, m, l = carry

    def scores(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, kt_slot)
        return acc_ref[...]

    s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, PAGE), jnp.float32)) * scale
    scores_done()
    s = jnp.where(iota(1) + j * PAGE <= iota(0) + first_position, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()
    wait_v()

    def values(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_slot)
        return acc_ref[...]

    pv = pl.run_scoped(values, plgpu.ACC((BLOCK_Q, acc.shape[1]), jnp.float32))
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l


def _kernel_call(kernel, q, args, grid_tiles: int, num_threads: int, interpret: bool):
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams(detect_races=True)
    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(q.shape[1], grid_tiles),
                        grid_names=("heads", "q_tiles"), num_threads=num_threads, thread_name="wg",
                        interpret=interpret or None)  # fmt: skip
    return call(q, *args)


SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def paged_prefill(q, k_pages_t, v_pages, block_table, context, *, scale: float, interpret: bool = False):
    """Causal attention of one sequence's chunk of queries over its paged cache (which already holds the chunk's K/V).

    q: [T, Hq, D], the queries at positions context .. context + T - 1 (T a multiple of 64).
    k_pages_t: [Hkv, pages, D, 64] (K, each page transposed); v_pages: [Hkv, pages, 64, D].
    block_table: int32 [n], the sequence's pages in order (n a multiple of 4, covering context + T tokens).
    context: int32 [4], the tokens before the chunk in element 0 (an array: the interpreter takes no scalars).
    Returns [T, Hq, D] in q's dtype. One warpgroup per (query head, 64-query tile), copies and math in sequence.
    """
    _check(q, k_pages_t, v_pages, block_table, context, BLOCK_Q)
    tokens, q_heads, head_dim = q.shape
    group, dtype = q_heads // k_pages_t.shape[0], q.dtype
    iota, initial = _layouts(interpret)

    def kernel(q_ref, kt_ref, v_ref, table_ref, context_ref, out_ref):
        def scoped(q_smem, kt_smem, v_smem, p_smem, table_smem, context_smem, barriers):
            head, tile = lax.axis_index("heads"), lax.axis_index("q_tiles")
            kv_head = lax.div(head, jnp.int32(group))
            setup, k_ready, v_ready = barriers.at[0], barriers.at[1], barriers.at[2]
            plgpu.copy_gmem_to_smem(table_ref, table_smem, setup)
            plgpu.barrier_wait(setup)
            plgpu.copy_gmem_to_smem(context_ref, context_smem, setup)
            plgpu.barrier_wait(setup)
            q_start = tile * BLOCK_Q
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_start, BLOCK_Q), head], q_smem, setup)
            plgpu.barrier_wait(setup)
            first_position = context_smem[0] + q_start  # of this tile's first query
            num_tiles = lax.div(first_position + BLOCK_Q - 1, jnp.int32(PAGE)) + 1  # causal: up to the last query

            def kv_tile(j, carry):
                page = table_smem[j]
                plgpu.copy_gmem_to_smem(kt_ref.at[kv_head, page], kt_smem, k_ready)
                plgpu.copy_gmem_to_smem(v_ref.at[kv_head, page], v_smem, v_ready)
                plgpu.barrier_wait(k_ready)
                return _attend(carry, j, first_position, q_smem, kt_smem, v_smem, p_smem, scale=scale, iota=iota,
                               wait_v=lambda: plgpu.barrier_wait(v_ready), scores_done=lambda: None)  # fmt: skip

            acc, m, l = lax.fori_loop(0, num_tiles, kv_tile, initial(head_dim))
            q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[pl.ds(q_start, BLOCK_Q), head])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((BLOCK_Q, head_dim), dtype, transforms=SWIZZLED),
            plgpu.SMEM((head_dim, PAGE), dtype, transforms=SWIZZLED),
            plgpu.SMEM((PAGE, head_dim), dtype, transforms=SWIZZLED),
            plgpu.SMEM((BLOCK_Q, PAGE), dtype, transforms=SWIZZLED),
            plgpu.SMEM(block_table.shape, jnp.int32),
            plgpu.SMEM((4,), jnp.int32),
            plgpu.Barrier(num_barriers=3),
            collective_axes="wg",
        )

    return _kernel_call(kernel, q, (k_pages_t, v_pages, block_table, context), tokens // BLOCK_Q, 1, interpret)


def paged_prefill_pipelined(q, k_pages_t, v_pages, block_table, context, *, scale: float, stages: int = 2,
                            interpret: bool = False):  # fmt: skip
    """The same attention with the work split as JAX's dense Mosaic GPU kernel splits it: per (query head, 128
    queries), two compute warpgroups (64 queries each) and a producer warpgroup that keeps `stages` K and V pages in
    flight, so copies overlap the math. T must be a multiple of 128. The producer fetches what the later compute
    warpgroup needs; the earlier one, whose causal range ends sooner, releases the pages it skips."""
    _check(q, k_pages_t, v_pages, block_table, context, 2 * BLOCK_Q)
    tokens, q_heads, head_dim = q.shape
    group, dtype = q_heads // k_pages_t.shape[0], q.dtype
    iota, initial = _layouts(interpret)

    def kernel(q_ref, kt_ref, v_ref, table_ref, context_ref, out_ref):
        def scoped(q_smem, kt_smem, v_smem, p_smem, table_smem, context_smem, setup, q_ready, k_ready, v_ready,
                   k_free, v_free):  # fmt: skip
            wg, head, tile = lax.axis_index("wg"), lax.axis_index("heads"), lax.axis_index("q_tiles")

            @pl.when(wg == 2)
            def _():
                plgpu.copy_gmem_to_smem(table_ref, table_smem, setup.at[0])
                plgpu.copy_gmem_to_smem(context_ref, context_smem, setup.at[1])

            plgpu.barrier_wait(setup.at[0])
            plgpu.barrier_wait(setup.at[1])
            context_len = context_smem[0]

            def tiles_for(q_start):  # KV tiles a 64-query tile starting at q_start attends to (causal)
                return lax.div(context_len + q_start + BLOCK_Q - 1, jnp.int32(PAGE)) + 1

            last_tiles = tiles_for(tile * 2 * BLOCK_Q + BLOCK_Q)  # the later compute warpgroup's count

            @pl.when(wg < 2)
            def _compute():
                q_start = tile * 2 * BLOCK_Q + wg * BLOCK_Q
                q_tile, p_tile = q_smem.at[wg], p_smem.at[wg]
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_start, BLOCK_Q), head], q_tile, q_ready.at[wg])
                plgpu.barrier_wait(q_ready.at[wg])
                first_position = context_len + q_start
                mine = tiles_for(q_start)

                def kv_tile(j, carry):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_ready.at[slot])
                    carry = _attend(carry, j, first_position, q_tile, kt_smem.at[slot], v_smem.at[slot], p_tile,
                                    scale=scale, iota=iota, wait_v=lambda: plgpu.barrier_wait(v_ready.at[slot]),
                                    scores_done=lambda: plgpu.barrier_arrive(k_free.at[slot]))  # fmt: skip
                    plgpu.barrier_arrive(v_free.at[slot])
                    return carry

                acc, m, l = lax.fori_loop(0, mine, kv_tile, initial(head_dim))
                q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_tile, out_ref.at[pl.ds(q_start, BLOCK_Q), head])

                def release(j, _):  # pages only the other warpgroup needs: let the producer reuse their slots (after
                    slot = lax.rem(j, jnp.int32(stages))  # they land: every barrier phase is seen by every waiter)
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])

                lax.fori_loop(mine, last_tiles, release, None)
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 2)
            def _produce():
                kv_head = lax.div(head, jnp.int32(group))

                def fetch(j, _):
                    slot, page = lax.rem(j, jnp.int32(stages)), table_smem[j]

                    @pl.when(j >= stages)  # the slot's previous page has been read by both compute warpgroups
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])

                    plgpu.copy_gmem_to_smem(kt_ref.at[kv_head, page], kt_smem.at[slot], k_ready.at[slot])

                    @pl.when(j >= stages)
                    def _():
                        plgpu.barrier_wait(v_free.at[slot])

                    plgpu.copy_gmem_to_smem(v_ref.at[kv_head, page], v_smem.at[slot], v_ready.at[slot])

                lax.fori_loop(0, last_tiles, fetch, None)

                def drain(j, _):  # the last pages' releases: every barrier phase is seen by every waiter
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

                lax.fori_loop(jnp.maximum(last_tiles - stages, 0), last_tiles, drain, None)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((2, BLOCK_Q, head_dim), dtype, transforms=SWIZZLED),
            plgpu.SMEM((stages, head_dim, PAGE), dtype, transforms=SWIZZLED),
            plgpu.SMEM((stages, PAGE, head_dim), dtype, transforms=SWIZZLED),
            plgpu.SMEM((2, BLOCK_Q, PAGE), dtype, transforms=SWIZZLED),
            plgpu.SMEM(block_table.shape, jnp.int32),
            plgpu.SMEM((4,), jnp.int32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            collective_axes="wg",
        )

    args = (k_pages_t, v_pages, block_table, context)
    return _kernel_call(kernel, q, args, tokens // (2 * BLOCK_Q), 3, interpret)


def random_case(tokens: int, context: int, q_heads: int, kv_heads: int, head_dim: int, dtype, seed: int = 0):
    """A chunk of `tokens` queries after `context` cached tokens, its sequence's pages scattered in a larger pool."""
    import numpy as np

    rng = np.random.default_rng(seed)
    length = context + tokens
    pages = -(-length // PAGE)
    table = np.zeros(-(-pages // 4) * 4, np.int32)
    pool = 2 * pages + 3
    table[:pages] = rng.permutation(pool)[:pages]
    q = jnp.asarray(rng.standard_normal((tokens, q_heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((kv_heads, pool, PAGE, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((kv_heads, pool, PAGE, head_dim)), dtype)
    return q, k, v, jnp.asarray(table), jnp.asarray([context, 0, 0, 0], jnp.int32)


def engine_reference(q, k, v, table, context: int, scale: float):
    """rtpjax's plain-jnp paged attention (the engine's reference) on the same cache, seen as the engine's pages of 16
    tokens: page p of 64 is blocks 4p .. 4p + 3."""
    from rtpjax.attention import AttentionMetadata, reference_attention

    tokens = q.shape[0]
    kv_heads, pool, _, head_dim = k.shape
    per = PAGE // 16
    blocks = (table[:, None] * per + jnp.arange(per)[None]).reshape(1, -1)
    meta = AttentionMetadata(jnp.asarray([0, tokens], jnp.int32), jnp.asarray([context + tokens], jnp.int32), blocks,
                             jnp.zeros(tokens, jnp.int32))  # fmt: skip
    cache = tuple(x.reshape(kv_heads, pool * per, 16, head_dim) for x in (k, v))
    return reference_attention(q.astype(jnp.float32), cache, meta, scale=scale)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=0)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--pipelined", action="store_true", help="the producer/consumer form")
    parser.add_argument("--stages", type=int, default=2, help="pages in flight (--pipelined)")
    parser.add_argument("--interpret", action="store_true", help="Mosaic GPU interpreter on CPU (small shapes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype, scale = jnp.dtype(args.dtype), args.head_dim**-0.5
    q, k, v, table, context = random_case(args.tokens, args.context, args.q_heads, args.kv_heads, args.head_dim, dtype)
    kt = jnp.swapaxes(k, 2, 3)
    kernel = functools.partial(paged_prefill_pipelined, stages=args.stages) if args.pipelined else paged_prefill
    run = jax.jit(functools.partial(kernel, scale=scale, interpret=args.interpret))
    out = run(q, kt, v, table, context).block_until_ready()
    ref = engine_reference(q, k, v, table, args.context, scale)
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, tokens=args.tokens,
                  context=args.context, dtype=args.dtype, pipelined=args.pipelined, stages=args.stages,
                  relative_error=err, nan=bool(jnp.isnan(out).any()))  # fmt: skip
    if not args.interpret:
        calls = 20
        began = time.perf_counter()
        for _ in range(calls):
            out = run(q, kt, v, table, context)
        out.block_until_ready()
        seconds = (time.perf_counter() - began) / calls
        t, c = args.tokens, args.context
        flops = 4 * args.q_heads * args.head_dim * t * (c + (t + 1) / 2)  # causal: each query sees context + its prefix
        result.update(us=seconds * 1e6, tflops=flops / seconds / 1e12)
    from rtpjax.benchmarks.probes import report

    report(result, args.out)


if __name__ == "__main__":
    main()
