"""Prefill attention on Hopper through the Mosaic GPU lowering (wgmma + TMA): the step's long query chunks, on the
engine's own paged cache. The Triton-lowered kernel issues `mma`, not Hopper's `wgmma` with TMA, and stops near 260
TFLOP/s on prefill; this one reaches the dense kernels (cuDNN, JAX's own Mosaic GPU attention), ~400 at 4096 tokens on
an H200 (benchmarks/RESULTS.md). Decode rows and short chunks stay with the Triton kernel (rtpjax.kernels.attention).

The work splits as in JAX's dense Mosaic GPU kernel: per (query head, tile of 128 queries of one sequence) two compute
warpgroups of 64 queries take turns on the tensor cores (one's softmax overlaps the other's wgmma) while a producer
warpgroup keeps KV tiles of 128 keys in flight, one TMA copy per cache block. A per-step plan lists the tiles; queries
are gathered into whole tiles first (TMA offsets into swizzled shared memory must be tile-aligned) and outputs
gathered back to the token axis.

JAX 0.10.2's Mosaic GPU interpreter (the CPU tests) has no register layouts, `run_state` accumulators or transposed
views, so there the two products are plain dots of the shared-memory tiles; plan, copies, barriers, turns and masks
are the same code.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from rtpjax.kernels import ptx

BLOCK_Q = 64  # queries per compute warpgroup: the wgmma M
TILE_Q = 2 * BLOCK_Q  # queries per program (two compute warpgroups)
TILE_KV = 128  # keys per pipeline step
MIN_QUERIES = 64  # sequences with fewer queries this step stay with the Triton kernel
MIN_TOKENS = 512  # steps with fewer tokens stay with it entirely (no prefill chunk worth a tile)
SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
MAX_TABLE = 255 * 32  # blocks per sequence: its table sits in shared memory as [rows <= 256 (a TMA box), 32]


def available() -> bool:
    """On a Hopper GPU. The engine uses it only with its mosaic_prefill option on (AttentionMetadata.mosaic_prefill).
    Opt-in: the kernel is 1.6x the Triton one, but its query and output gathers, the merge and the Triton kernel's
    mostly empty launch cost a fixed ~7 ms a step (Llama-3-8B), which it wins back only from ~4,500 cached tokens: 2-5%
    slower on 2000-token prompts, 14% faster a step at 14k (benchmarks/RESULTS.md)."""
    cc = ptx.compute_capability()
    return cc is not None and cc[0] == 9


def supports(q, cache, window, soft_cap, max_blocks: int) -> bool:
    """Whether a layer can run here: an unquantized cache of the queries' 16-bit dtype, head_dim 64 or 128, blocks of
    8-128 tokens that tile 128 keys, no window or soft-cap, and a block table that fits shared memory."""
    block_size, head_dim = cache[0].shape[2], q.shape[-1]
    return (len(cache) == 2 and cache[0].dtype == q.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim in (64, 128) and block_size % 8 == 0 and TILE_KV % block_size == 0
            and window is None and soft_cap is None and max_blocks <= MAX_TABLE)  # fmt: skip


def table_rows(block_tables):
    """Block tables as the kernel reads them: [S, rows, 32] (copies into shared memory move whole 128-byte rows).
    Always padded, by one row at least: a fresh buffer. The Mosaic GPU call rejects inputs that are not 256-byte
    aligned, and unpadded the tables can reach it as a view into the runner's packed step inputs at any offset (on the
    H200: "Input buffer 3 is not 256-byte aligned")."""
    width = (block_tables.shape[1] // 32 + 1) * 32
    return jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1]))).reshape(block_tables.shape[0], -1, 32)


def prefills(meta) -> jax.Array:
    """Which sequences of the step this kernel takes: those with at least MIN_QUERIES queries."""
    qsl = meta.query_start_loc
    return (qsl[1:] - qsl[:-1]) >= MIN_QUERIES


def plan(meta, num_tokens: int) -> dict:
    """The step's tiles, made once for all layers. tiles: int32 [n, 32] = (first query's token, its position, sequence,
    sequence length, 0...), length 0 for an unused tile; q_rows: the token behind each tile row (a tile's rows past its
    sequence repeat its last token); out_rows: each token's row among the tiles; mine: tokens this kernel answers.
    n is static: a taken sequence of q >= MIN_QUERIES queries needs ceil(q / 128) <= q / MIN_QUERIES tiles."""
    from rtpjax.kernels.metadata import token_layout
    from rtpjax.kernels.ragged_paged_attention import query_blocks

    qsl, seq_lens = meta.query_start_loc, meta.seq_lens
    take = prefills(meta)
    num_tiles = max(1, min(num_tokens // MIN_QUERIES, -(-num_tokens // TILE_Q) + seq_lens.shape[0]))
    seq, first, rows = query_blocks(meta, num_tokens, TILE_Q, skip=~take, num_blocks=num_tiles)  # tiles = query blocks
    position = seq_lens[seq] - qsl[seq + 1] + first
    tiles = jnp.stack([first, position, seq, jnp.where(rows > 0, seq_lens[seq], 0)], 1)
    q_rows = jnp.minimum(first[:, None] + jnp.arange(TILE_Q), jnp.maximum(qsl[seq + 1] - 1, 0)[:, None]).reshape(-1)

    token_seq, _, valid = token_layout(meta, num_tokens)
    mine = take[token_seq] & valid
    count = jnp.where(take, (qsl[1:] - qsl[:-1] + TILE_Q - 1) // TILE_Q, 0)
    local = jnp.arange(num_tokens, dtype=jnp.int32) - qsl[token_seq]
    out_rows = jnp.where(mine, (jnp.cumsum(count) - count)[token_seq] * TILE_Q + local, 0)
    return dict(tiles=jnp.pad(tiles, ((0, 0), (0, 28))).astype(jnp.int32), q_rows=q_rows.astype(jnp.int32),
                out_rows=out_rows.astype(jnp.int32), mine=mine)  # fmt: skip


def prefill_attention(q, cache, block_tables, step_plan: dict, *, scale: float, interpret: bool = False):
    """Causal attention of the planned sequences' queries over their cache (holding this step's K/V already).
    q: [T, Hq, D]; cache: (k, v), each [Hkv, blocks, block_size, D]. Returns [T, Hq, D]; rows of tokens the plan
    does not take (`step_plan["mine"]` false) are unspecified."""
    if not supports(q, cache, None, None, block_tables.shape[1]):
        raise ValueError(f"prefill_attention needs bfloat16/float16 queries and an unquantized cache of that dtype, "
                         f"head_dim 64 or 128, blocks of 8-128 tokens dividing 128 and at most {MAX_TABLE} blocks per "
                         f"sequence; got q {q.dtype}{list(q.shape)}, cache {[(c.dtype.name, c.shape) for c in cache]}, "
                         f"{block_tables.shape[1]} blocks per sequence")  # fmt: skip
    out_tiles = attention_in_tiles(q[step_plan["q_rows"]], cache, table_rows(block_tables), step_plan["tiles"],
                                   scale=scale, interpret=interpret)  # fmt: skip
    return out_tiles[step_plan["out_rows"]]


def attention_in_tiles(q_tiles, cache, tables, tiles, *, scale: float, stages: int = 2, interpret: bool = False):
    """The kernel alone: queries already in whole tiles ([n * 128, Hq, D]), block tables as `table_rows` makes them.
    Returns the outputs in whole tiles."""
    k_cache, v_cache = cache
    rows, q_heads, head_dim = q_tiles.shape
    kv_heads, _, block_size, _ = k_cache.shape
    kernel, scratch = _kernel(q_heads // kv_heads, head_dim, block_size, q_tiles.dtype, tables.shape[1:], scale,
                              interpret, stages=stages)  # fmt: skip
    params = dict(compiler_params=plgpu.CompilerParams(approx_math=True))
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params = dict(interpret=InterpretGPUParams(detect_races=True))
    call = plgpu.kernel(lambda *refs: pl.run_scoped(functools.partial(kernel, *refs), *scratch, collective_axes="wg"),
                        out_type=jax.ShapeDtypeStruct((rows, q_heads, head_dim), q_tiles.dtype),
                        grid=(q_heads, tiles.shape[0]), grid_names=("heads", "q_tiles"), num_threads=3,
                        thread_name="wg", **params)  # fmt: skip
    return call(q_tiles, k_cache, v_cache, tables, tiles)


def _gpu_forms(interpret: bool):
    """What differs between the GPU lowering and the interpreter (same math). Returns iota(dim) over a score tile;
    initial(head_dim), the starting accumulator, max and sum; scores(q, k, meanwhile) = q @ k.T, calling meanwhile()
    while the wgmma runs; values(acc, p, v, meanwhile) = acc + p @ v likewise: on the GPU p stays in registers and
    acc in the wgmma accumulator."""
    shape, row_layout = (BLOCK_Q, TILE_KV), plgpu.Layout.WGMMA.reduce(1)
    if interpret:
        cast = lambda x, layout: x  # noqa: E731
        iota = lambda dim: lax.broadcasted_iota(jnp.int32, shape, dim)  # noqa: E731
        dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)

        def scores(q_smem, k_smem, meanwhile):
            s = dot(q_smem[...], k_smem[...].T)
            meanwhile()
            return s

        def values(acc, p, v_smem, meanwhile):
            acc = acc + dot(p, v_smem[...])
            meanwhile()
            return acc
    else:
        cast = plgpu.layout_cast
        iota = lambda dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)  # noqa: E731

        def scores(q_smem, k_smem, meanwhile):
            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
                meanwhile()
                return acc_ref[...]

            return pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))

        def values(acc, p, v_smem, meanwhile):
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p, v_smem)
                meanwhile()

            return pl.run_state(pv)(plgpu.ACC.init(acc))

    def initial(head_dim):
        acc = cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m, l = jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), jnp.zeros((BLOCK_Q,), jnp.float32)
        return acc, cast(m, row_layout), cast(l, row_layout)

    return iota, initial, scores, values


def _kv_tiles(first_position, seq_len):
    """KV tiles a 64-query block whose first query sits at `first_position` attends to: causal, within the sequence."""
    causal = lax.div(first_position + BLOCK_Q - 1, jnp.int32(TILE_KV)) + 1
    return jnp.minimum(causal, lax.div(seq_len + TILE_KV - 1, jnp.int32(TILE_KV)))


def _kernel(group, head_dim, block_size, dtype, table_shape, scale, interpret, *, stages: int):
    """Per (query head, 128-query tile): compute warpgroups 0 and 1 (64 queries each), producer warpgroup 2. The
    producer fetches what the later compute warpgroup needs; the earlier one, whose causal range ends sooner, releases
    the tiles it skips. The running max is kept in log2 units (exp2, one multiply folds the scale); only the KV tiles
    on a warpgroup's causal diagonal are masked."""
    iota, initial, scores, values = _gpu_forms(interpret)
    blocks_per_tile = TILE_KV // block_size
    log2_scale = scale * math.log2(math.e)

    def kernel(q_ref, k_ref, v_ref, tables_ref, tiles_ref, out_ref, q_smem, k_smem, v_smem, table_smem, tile_smem,
               setup, q_ready, k_ready, v_ready, k_free, v_free, turn):  # fmt: skip
        wg, head = lax.axis_index("wg"), lax.axis_index("heads")
        tile = lax.axis_size("q_tiles") - 1 - lax.axis_index("q_tiles")  # last tiles see the longest contexts: first
        producer = wg == 2

        def load(src, dst, bar):  # the producer copies, every warpgroup waits
            pl.when(producer)(lambda: plgpu.copy_gmem_to_smem(src, dst, bar))
            plgpu.barrier_wait(bar)

        load(tiles_ref.at[tile], tile_smem, setup.at[0])
        first_position, seq, seq_len = tile_smem[1], tile_smem[2], tile_smem[3]
        load(tables_ref.at[seq], table_smem, setup.at[1])
        # The later compute warpgroup's count, which the producer fetches: the earlier one's when the later one's
        # rows are all past the sequence's end (the last tile of a sequence) and it skips the math.
        later = first_position + BLOCK_Q
        last_tiles = _kv_tiles(jnp.where(later < seq_len, later, first_position), seq_len)

        def take_turn():  # both compute warpgroups arrive; alternating phases keep them half a step apart
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when((wg < 2) & (seq_len > 0))
        def _compute():
            plgpu.set_max_registers(232, action="increase")  # registers move to the math (JAX's dense split)
            q_tile = q_smem.at[wg]
            first_row = pl.multiple_of(tile * TILE_Q + wg * BLOCK_Q, BLOCK_Q)
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(first_row, BLOCK_Q), head], q_tile, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            position = first_position + wg * BLOCK_Q
            mine = jnp.where(position < seq_len, _kv_tiles(position, seq_len), 0)
            unmasked = jnp.minimum(lax.div(position + 1, jnp.int32(TILE_KV)), mine)  # tiles wholly before the diagonal

            def wait_k(j):
                plgpu.barrier_wait(k_ready.at[lax.rem(j, jnp.int32(stages))])

            def kv_tile(j, carry, masked):  # K of tile j has landed (waited for during tile j - 1's values)
                acc, m, l = carry
                slot = lax.rem(j, jnp.int32(stages))
                s = scores(q_tile, k_smem.at[slot], take_turn)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    s = jnp.where(iota(1) + j * TILE_KV <= iota(0) + position, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * log2_scale)  # the running max in log2 units: one FMA below
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * log2_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                # As JAX's dense kernel: pinning the softmax's results before the hand-over measures faster.
                acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p.astype(dtype)))
                plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup's wgmma may go
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)
                acc = values(acc, p, v_smem.at[slot], lambda: pl.when(j + 1 < mine)(lambda: wait_k(j + 1)))
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
            l = jnp.where(l > 0, l, 1.0)  # 0 only in a warpgroup that skipped the math (rows nobody reads)
            q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, out_ref.at[pl.ds(first_row, BLOCK_Q), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(producer & (seq_len > 0))
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(group))

            def fetch(j, _):
                slot = lax.rem(j, jnp.int32(stages))
                first = j * blocks_per_tile  # blocks per tile divide 32: one row of the table holds them all
                row, col = lax.div(first, jnp.int32(32)), lax.rem(first, jnp.int32(32))
                blocks = [table_smem[row, col + i] for i in range(blocks_per_tile)]
                for ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free)):

                    @pl.when(j >= stages)  # the slot's previous tile has been read by both compute warpgroups
                    def _():
                        plgpu.barrier_wait(free.at[slot])

                    for i, block in enumerate(blocks):
                        rows = smem.at[slot, pl.ds(i * block_size, block_size)]
                        plgpu.copy_gmem_to_smem(ref.at[kv_head, block], rows, ready.at[slot])

            lax.fori_loop(0, last_tiles, fetch, None)

            def drain(j, _):  # the last tiles' releases: every barrier phase is seen by every waiter
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

            lax.fori_loop(jnp.maximum(last_tiles - stages, 0), last_tiles, drain, None)

    scratch = (plgpu.SMEM((2, BLOCK_Q, head_dim), dtype, transforms=SWIZZLED),
               plgpu.SMEM((stages, TILE_KV, head_dim), dtype, transforms=SWIZZLED),
               plgpu.SMEM((stages, TILE_KV, head_dim), dtype, transforms=SWIZZLED),
               plgpu.SMEM(table_shape, jnp.int32), plgpu.SMEM((32,), jnp.int32),
               plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
               plgpu.Barrier(num_arrivals=blocks_per_tile, num_barriers=stages),  # one arrival per block copied
               plgpu.Barrier(num_arrivals=blocks_per_tile, num_barriers=stages),
               plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # both compute warpgroups release a slot
               plgpu.Barrier(num_arrivals=2, num_barriers=stages),
               plgpu.Barrier(num_arrivals=2))  # turns on the tensor cores
    return kernel, scratch
