"""Prefill attention over a paged KV cache with the Mosaic GPU lowering (wgmma + TMA, Hopper): the candidate for
issue 4's prefill goal. JAX's own dense Mosaic GPU attention reaches 418-491 TFLOP/s at that shape on an H200, the
Triton-lowered kernel 256 (benchmarks/RESULTS.md); this is a prototype beside the engine's kernel, not wired into it.

It takes a step as the engine packs it (queries of many sequences on one token axis, `query_start_loc`, `seq_lens`,
a page table per sequence) and runs over a plan of query tiles made once per step: each tile is 128 queries of one
sequence, so no tile mixes sequences; queries are gathered into whole tiles (TMA offsets into swizzled shared memory
must be tile-aligned) and outputs land in whole tiles, gathered back to the token axis (a tile's rows past its
sequence's end are computed and dropped).

Pages hold 64 tokens and K pages are stored transposed ([head_dim, page]) so TMA brings K^T as the first wgmma's B
operand; a KV tile is one or two pages. The work splits as in JAX's dense kernel: two compute warpgroups taking turns
on the tensor cores and a producer warpgroup keeping KV tiles in flight. It runs in JAX 0.10.2's Mosaic GPU
interpreter on CPU (the tests), where probabilities go through shared memory and accumulators are scoped.

    python -m rtpjax.benchmarks.kernels.mosaic_prefill --tokens 4096 [--kv-pages 2] [--stages 2]   # on a Hopper GPU
    python -m rtpjax.benchmarks.kernels.mosaic_prefill --tokens 128 --interpret                     # anywhere, slowly
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

PAGE = 64  # tokens per page = per KV tile: 64 x 2 bytes is one 128-byte swizzle row of a transposed K page
BLOCK_Q = 64  # queries per compute warpgroup: the wgmma M
SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _tiles_per_sequence(query_start_loc, rows: int):
    """Each sequence's query count, and the range of tile indices its queries take (tiles in sequence order)."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    count = (q_lens + rows - 1) // rows
    ends = jnp.cumsum(count)
    return q_lens, ends - count, ends


def prefill_plan(query_start_loc, seq_lens, *, rows: int, num_tiles: int):
    """The step's query tiles: int32 [num_tiles, 4] = (first row on the token axis, position of that row's query,
    sequence, sequence length; 0 marks an unused tile). `num_tiles` is static: tokens / rows + sequences suffices."""
    q_lens, starts, ends = _tiles_per_sequence(query_start_loc, rows)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, tile, side="right"), seq_lens.shape[0] - 1).astype(jnp.int32)
    k = tile - starts[seq]
    live = tile < ends[-1]
    first_position = seq_lens[seq] - q_lens[seq] + k * rows
    return jnp.stack([query_start_loc[seq] + k * rows, first_position, seq, jnp.where(live, seq_lens[seq], 0)], 1)


def _tokens_from_tiles(out_tiles, query_start_loc, rows: int, tokens: int):
    """Each token's row in the buffer of whole tiles (tokens past the last sequence read row 0, as padding)."""
    _, starts, _ = _tiles_per_sequence(query_start_loc, rows)
    i = jnp.arange(tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(query_start_loc[1:], i, side="right"), starts.shape[0] - 1)
    k = i - query_start_loc[seq]
    row = jnp.where(i < query_start_loc[-1], (starts[seq] + k // rows) * rows + k % rows, 0)
    return out_tiles[row]


def _check(q, k_pages_t, v_pages, page_tables, query_start_loc, seq_lens):
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_pages_t.shape[0]
    if q_heads % kv_heads or k_pages_t.shape[2:] != (head_dim, PAGE):
        raise ValueError(f"query heads {q_heads} must be a multiple of KV heads {kv_heads}, and K pages "
                         f"[Hkv, pages, {head_dim}, {PAGE}]; got {k_pages_t.shape}")  # fmt: skip
    if v_pages.shape != (kv_heads, k_pages_t.shape[1], PAGE, head_dim) or head_dim % 64:
        raise ValueError(f"V pages must be [Hkv, pages, {PAGE}, head_dim] with head_dim a multiple of 64")
    if page_tables.ndim != 2 or page_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("page_tables must be [sequences, n] (one row per sequence)")
    if query_start_loc.shape != (seq_lens.shape[0] + 1,):
        raise ValueError("query_start_loc must have one more entry than seq_lens")


def _gpu_forms(interpret: bool):
    """What differs between the GPU lowering and JAX 0.10.2's interpreter, which has no rule for register layouts or
    `run_state` accumulators and takes wgmma operands from shared memory only (the math is the same). Returns
    iota(dim, width) over a [BLOCK_Q, width] tile; initial(head_dim), the starting accumulator, max and sum; and
    values(acc, p, v, p_smem, meanwhile), acc + p @ v, calling meanwhile() while the wgmma runs: on the GPU p stays in
    registers and acc in the wgmma accumulator."""
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    if interpret:
        cast = lambda x, layout: x  # noqa: E731
        iota = lambda dim, width: lax.broadcasted_iota(jnp.int32, (BLOCK_Q, width), dim)  # noqa: E731

        def values(acc, p, v_slot, p_smem, meanwhile):
            p_smem[...] = p
            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_slot)
                meanwhile()
                return acc_ref[...]

            return acc + pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
    else:
        cast = plgpu.layout_cast
        iota = lambda dim, width: plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, width), dim,  # noqa: E731
                                                         layout=plgpu.Layout.WGMMA)  # fmt: skip

        def values(acc, p, v_slot, p_smem, meanwhile):
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p, v_slot)
                meanwhile()

            return pl.run_state(pv)(plgpu.ACC.init(acc))

    def initial(head_dim):
        acc = cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m, l = jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), jnp.zeros((BLOCK_Q,), jnp.float32)
        return acc, cast(m, row_layout), cast(l, row_layout)

    return iota, initial, values


def paged_prefill(q, k_pages_t, v_pages, page_tables, query_start_loc, seq_lens, *, scale: float,
                  kv_pages: int = 2, stages: int = 2, interpret: bool = False):  # fmt: skip
    """Causal attention of each sequence's chunk of queries over its paged cache (which already holds the chunk's K/V).

    q: [T, Hq, D], sequences' queries packed on the token axis; query_start_loc: int32 [S + 1]; seq_lens: int32 [S],
    each sequence's length after the chunk (its queries sit at positions seq_len - q_len .. seq_len - 1).
    k_pages_t: [Hkv, pages, D, 64] (K, each page transposed); v_pages: [Hkv, pages, 64, D].
    page_tables: int32 [S, n], each sequence's pages in order. Returns [T, Hq, D] in q's dtype.
    kv_pages: pages per KV tile (each wgmma covers 64 x kv_pages keys); stages: KV tiles in flight.
    """
    _check(q, k_pages_t, v_pages, page_tables, query_start_loc, seq_lens)
    q_tiles, plan, page_tables = queries_in_tiles(q, page_tables, query_start_loc, seq_lens)
    out_tiles = attention_in_tiles(q_tiles, k_pages_t, v_pages, page_tables, plan, scale=scale, kv_pages=kv_pages,
                                   stages=stages, interpret=interpret)  # fmt: skip
    return _tokens_from_tiles(out_tiles, query_start_loc, 2 * BLOCK_Q, q.shape[0])


def queries_in_tiles(q, page_tables, query_start_loc, seq_lens):
    """The kernel's inputs: queries gathered into the plan's whole tiles of 128 (a tile's rows past its sequence
    repeat the last token; TMA copies into swizzled shared memory need tile-aligned offsets), the plan, and the page
    tables, both padded to rows of 32 ints (copies into shared memory move whole 128-byte rows per warpgroup)."""
    rows = 2 * BLOCK_Q
    num_tiles = -(-q.shape[0] // rows) + seq_lens.shape[0]
    plan = prefill_plan(query_start_loc, seq_lens, rows=rows, num_tiles=num_tiles)
    token = jnp.minimum(plan[:, :1] + jnp.arange(rows, dtype=jnp.int32), q.shape[0] - 1).reshape(-1)
    plan = jnp.pad(plan, ((0, 0), (0, 32 - plan.shape[1])))
    return q[token], plan, jnp.pad(page_tables, ((0, 0), (0, -page_tables.shape[1] % 32)))


def attention_in_tiles(q_tiles, k_pages_t, v_pages, page_tables, plan, *, scale: float, kv_pages: int = 2,
                       stages: int = 2, interpret: bool = False):  # fmt: skip
    """The kernel alone, on `queries_in_tiles`'s outputs: paged_prefill without the gathers around it. Returns the
    outputs in whole tiles."""
    num_tiles, (tokens, q_heads, head_dim) = plan.shape[0], q_tiles.shape
    kernel, scratch = _kernel(q_heads // k_pages_t.shape[0], head_dim, q_tiles.dtype, page_tables.shape[1], scale,
                              interpret, kv_pages=kv_pages, stages=stages)  # fmt: skip
    params = dict(compiler_params=plgpu.CompilerParams(approx_math=True))
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params = dict(interpret=InterpretGPUParams(detect_races=True))
    call = plgpu.kernel(lambda *refs: pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg"),
                        out_type=jax.ShapeDtypeStruct((tokens, q_heads, head_dim), q_tiles.dtype),
                        grid=(q_heads, num_tiles), grid_names=("heads", "q_tiles"), num_threads=3, thread_name="wg",
                        **params)  # fmt: skip
    return call(q_tiles, k_pages_t, v_pages, page_tables, plan)


def _kv_tiles(first_position, seq_len, width: int):
    """KV tiles of `width` keys a 64-query tile whose first query sits at `first_position` attends to: causal, within
    the sequence."""
    causal = lax.div(first_position + BLOCK_Q - 1, jnp.int32(width)) + 1
    return jnp.minimum(causal, lax.div(seq_len + width - 1, jnp.int32(width)))


def _read_plan(tile, plan_ref, tables_ref, plan_smem, table_smem, barrier, issuer):
    """This tile's plan entry, then its sequence's page table, into shared memory; returns (first query's position,
    sequence length). Only `issuer` (a traced condition) issues the copies; every warpgroup waits for them."""

    def copy(src, dst, bar):
        pl.when(issuer)(lambda: plgpu.copy_gmem_to_smem(src, dst, bar))
        plgpu.barrier_wait(bar)

    copy(plan_ref.at[tile], plan_smem, barrier.at[0])
    first_position, seq, seq_len = (plan_smem[i] for i in range(1, 4))
    copy(tables_ref.at[seq], table_smem, barrier.at[1])
    return first_position, seq_len


def _kernel(group, head_dim, dtype, table_width, scale, interpret, *, kv_pages: int, stages: int):
    """Per (query head, 128-query tile), as JAX's dense Mosaic GPU kernel splits the work: two compute warpgroups (64
    queries each) and a producer warpgroup keeping `stages` KV tiles in flight, so copies overlap the math. The compute
    warpgroups take turns on the tensor cores (one's softmax overlaps the other's wgmma), mask only the KV tiles on
    their causal diagonal, and keep the running max in log2 units (exp2, one multiply folds the scale). The producer
    fetches what the later compute warpgroup needs; the earlier one, whose causal range ends sooner, releases the
    tiles it skips."""
    iota, initial, values = _gpu_forms(interpret)
    width = kv_pages * PAGE  # keys per KV tile
    log2_scale = scale * math.log2(math.e)

    def kernel(q_ref, kt_ref, v_ref, tables_ref, plan_ref, out_ref, q_smem, kt_smem, v_smem, table_smem, plan_smem,
               setup, q_ready, k_ready, v_ready, k_free, v_free, turn, *p_smem):  # fmt: skip
        wg, head = lax.axis_index("wg"), lax.axis_index("heads")
        tile = lax.axis_size("q_tiles") - 1 - lax.axis_index("q_tiles")  # the last tiles see the longest contexts: first
        issue = wg == 2  # the producer issues every copy but the compute warpgroups' queries
        first_position, seq_len = _read_plan(tile, plan_ref, tables_ref, plan_smem, table_smem, setup, issue)
        last_tiles = _kv_tiles(first_position + BLOCK_Q, seq_len, width)  # the later compute warpgroup's count

        def take_turn():  # both compute warpgroups arrive; alternating phases keep them half a step apart
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when((wg < 2) & (seq_len > 0))
        def _compute():
            plgpu.set_max_registers(232, action="increase")  # registers move to the math (JAX's dense split)
            q_tile, p_tile = q_smem.at[wg], (p_smem[0].at[wg] if p_smem else None)
            first_row = pl.multiple_of(tile * 2 * BLOCK_Q + wg * BLOCK_Q, BLOCK_Q)
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(first_row, BLOCK_Q), head], q_tile, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            position = first_position + wg * BLOCK_Q
            mine = _kv_tiles(position, seq_len, width)
            unmasked = jnp.minimum(lax.div(position + 1, jnp.int32(width)), mine)  # tiles wholly before the diagonal

            def wait_k(j):
                plgpu.barrier_wait(k_ready.at[lax.rem(j, jnp.int32(stages))])

            def kv_tile(j, carry, masked):  # K of tile j has landed (waited for during tile j - 1's values)
                acc, m, l = carry
                slot = lax.rem(j, jnp.int32(stages))

                def scores(acc_ref):  # one wgmma per page: a page's K^T is a contiguous [head_dim, 64] tile
                    for i in range(kv_pages):
                        plgpu.wgmma(acc_ref.at[:, pl.ds(i * PAGE, PAGE)], q_tile, kt_smem.at[slot, i])
                    take_turn()
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, width), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    s = jnp.where(iota(1, width) + j * width <= iota(0, width) + position, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * log2_scale)  # the running max in log2 units: one FMA below
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * log2_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                # JAX's dense kernel: pinning the softmax's results before the turn hand-over measures faster
                acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p.astype(dtype)))
                plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup's wgmma may go
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)
                acc = values(acc, p, v_smem.at[slot], p_tile, lambda: pl.when(j + 1 < mine)(lambda: wait_k(j + 1)))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            pl.when(mine > 0)(lambda: wait_k(0))
            pl.when(wg == 1)(take_turn)
            carry = lax.fori_loop(0, unmasked, functools.partial(kv_tile, masked=False), initial(head_dim))
            acc, m, l = lax.fori_loop(unmasked, mine, functools.partial(kv_tile, masked=True), carry)

            def release(j, _):  # tiles only the other warpgroup needs: free their slots (once landed: every barrier
                slot = lax.rem(j, jnp.int32(stages))  # phase is seen by every waiter) and keep taking turns
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            lax.fori_loop(mine, last_tiles, release, None)
            pl.when(wg == 0)(take_turn)
            q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, out_ref.at[pl.ds(first_row, BLOCK_Q), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(issue & (seq_len > 0))
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(group))

            def fetch(j, _):
                slot = lax.rem(j, jnp.int32(stages))
                pages = [table_smem[j * kv_pages + i] for i in range(kv_pages)]

                @pl.when(j >= stages)  # the slot's previous tile has been read by both compute warpgroups
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                for i, page in enumerate(pages):
                    plgpu.copy_gmem_to_smem(kt_ref.at[kv_head, page], kt_smem.at[slot, i], k_ready.at[slot])

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                for i, page in enumerate(pages):
                    plgpu.copy_gmem_to_smem(v_ref.at[kv_head, page], v_smem.at[slot, pl.ds(i * PAGE, PAGE)],
                                            v_ready.at[slot])  # fmt: skip

            lax.fori_loop(0, last_tiles, fetch, None)

            def drain(j, _):  # the last tiles' releases: every barrier phase is seen by every waiter
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

            lax.fori_loop(jnp.maximum(last_tiles - stages, 0), last_tiles, drain, None)

    scratch = (plgpu.SMEM((2, BLOCK_Q, head_dim), dtype, transforms=SWIZZLED),
               plgpu.SMEM((stages, kv_pages, head_dim, PAGE), dtype, transforms=SWIZZLED),
               plgpu.SMEM((stages, width, head_dim), dtype, transforms=SWIZZLED),
               plgpu.SMEM((table_width,), jnp.int32), plgpu.SMEM((32,), jnp.int32),
               plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
               plgpu.Barrier(num_arrivals=kv_pages, num_barriers=stages),  # one arrival per page copied
               plgpu.Barrier(num_arrivals=kv_pages, num_barriers=stages),
               plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # both compute warpgroups release a slot
               plgpu.Barrier(num_arrivals=2, num_barriers=stages),
               plgpu.Barrier(num_arrivals=2))  # turns on the tensor cores
    if interpret:  # probabilities reach the second wgmma through shared memory there
        scratch += (plgpu.SMEM((2, BLOCK_Q, width), dtype, transforms=SWIZZLED),)
    return kernel, scratch


def random_case(chunks, q_heads: int, kv_heads: int, head_dim: int, dtype, seed: int = 0):
    """A step of prefill chunks: `chunks` is [(queries, cached tokens before them)] per sequence; their pages are
    scattered over a larger pool. Returns q, k, v ([Hkv, pool, 64, D] each), page_tables, query_start_loc, seq_lens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    q_lens = [n for n, _ in chunks]
    lengths = [n + c for n, c in chunks]
    pages = [-(-length // PAGE) for length in lengths]
    pool = 2 * sum(pages) + 3
    tables = np.zeros((len(chunks), -(-max(pages) // 4) * 4), np.int32)
    order = rng.permutation(pool)
    for s, (n, start) in enumerate(zip(pages, np.cumsum([0] + pages[:-1]))):
        tables[s, :n] = order[start : start + n]
    q = jnp.asarray(rng.standard_normal((sum(q_lens), q_heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((kv_heads, pool, PAGE, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((kv_heads, pool, PAGE, head_dim)), dtype)
    query_start_loc = jnp.asarray(np.cumsum([0] + q_lens), jnp.int32)
    return q, k, v, jnp.asarray(tables), query_start_loc, jnp.asarray(lengths, jnp.int32)


def engine_reference(q, k, v, page_tables, query_start_loc, seq_lens, scale: float):
    """rtpjax's plain-jnp paged attention (the engine's reference) on the same cache, seen as the engine's pages of 16
    tokens: page p of 64 is blocks 4p .. 4p + 3."""
    from rtpjax.attention import AttentionMetadata, reference_attention

    kv_heads, pool, _, head_dim = k.shape
    per = PAGE // 16
    blocks = (page_tables[:, :, None] * per + jnp.arange(per)).reshape(page_tables.shape[0], -1)
    meta = AttentionMetadata(query_start_loc, seq_lens, blocks, jnp.zeros(q.shape[0], jnp.int32))
    cache = tuple(x.reshape(kv_heads, pool * per, 16, head_dim) for x in (k, v))
    return reference_attention(q.astype(jnp.float32), cache, meta, scale=scale)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="one sequence's chunk")
    parser.add_argument("--context", type=int, default=0, help="tokens cached before it")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--kv-pages", type=int, default=2, help="pages of 64 keys per KV tile")
    parser.add_argument("--stages", type=int, default=2, help="KV tiles in flight")
    parser.add_argument("--interpret", action="store_true", help="Mosaic GPU interpreter on CPU (small shapes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype, scale = jnp.dtype(args.dtype), args.head_dim**-0.5
    q, k, v, tables, qsl, lens = random_case([(args.tokens, args.context)], args.q_heads, args.kv_heads, args.head_dim,
                                             dtype)  # fmt: skip
    kt = jnp.swapaxes(k, 2, 3)
    run = jax.jit(functools.partial(paged_prefill, scale=scale, kv_pages=args.kv_pages, stages=args.stages,
                                    interpret=args.interpret))  # fmt: skip
    out = run(q, kt, v, tables, qsl, lens).block_until_ready()
    # The reference gathers each query's whole context: in chunks of queries (each a chunk of the one sequence).
    ref = jnp.concatenate([engine_reference(q[a : a + 512], k, v, tables, jnp.asarray([0, len(q[a : a + 512])]),
                                            lens - len(q) + a + len(q[a : a + 512]), scale)
                           for a in range(0, len(q), 512)])  # fmt: skip
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, tokens=args.tokens,
                  context=args.context, dtype=args.dtype, kv_pages=args.kv_pages, stages=args.stages,
                  relative_error=err, nan=bool(jnp.isnan(out).any()))  # fmt: skip
    if not args.interpret:
        calls = 20
        began = time.perf_counter()
        for _ in range(calls):
            out = run(q, kt, v, tables, qsl, lens)
        out.block_until_ready()
        seconds = (time.perf_counter() - began) / calls
        t, c = args.tokens, args.context
        flops = 4 * args.q_heads * args.head_dim * t * (c + (t + 1) / 2)  # causal: each query sees context + its prefix
        result.update(us=seconds * 1e6, tflops=flops / seconds / 1e12)
    from rtpjax.benchmarks.probes import report

    report(result, args.out)


if __name__ == "__main__":
    main()
