"""Prefill attention over a paged KV cache with the Mosaic GPU lowering (wgmma + TMA, Hopper): the candidate for
issue 4's prefill goal. JAX's own dense Mosaic GPU attention reaches 491 TFLOP/s at that shape on an H200, the
Triton-lowered kernel 256 (benchmarks/RESULTS.md); this is a prototype beside the engine's kernel, not wired into it.

Written so JAX 0.10.2's Mosaic GPU interpreter runs it on CPU, where the tests compare it with the plain-jnp
reference: K pages are stored transposed ([head_dim, page]) so TMA brings K^T tiles as the first wgmma's B operand
(the interpreter has no transposed views), the probabilities reach the second wgmma through shared memory, and the
accumulators are scoped (no `run_state`). One page of 64 tokens is one KV tile. This first version is one warpgroup
per (query head, 64-query tile), copies and math in sequence: the pipelined form (a producer warpgroup and two
consumers, as JAX's dense kernel) comes once this one lowers on the GPU.

    python -m rtpjax.benchmarks.kernels.mosaic_prefill --tokens 4096 --context 0       # on a Hopper GPU
    python -m rtpjax.benchmarks.kernels.mosaic_prefill --tokens 128 --interpret         # anywhere, slowly
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

PAGE = 64  # tokens per page = per KV tile: 64 x 2 bytes is one 128-byte swizzle row of a transposed K page
BLOCK_Q = 64  # queries per warpgroup: the wgmma M


def paged_prefill(q, k_pages_t, v_pages, block_table, context, *, scale: float, interpret: bool = False):
    """Causal attention of one sequence's chunk of queries over its paged cache (which already holds the chunk's K/V).

    q: [T, Hq, D], the queries at positions context .. context + T - 1 (T a multiple of 64).
    k_pages_t: [Hkv, pages, D, 64] (K, each page transposed); v_pages: [Hkv, pages, 64, D].
    block_table: int32 [n], the sequence's pages in order (n a multiple of 4, covering context + T tokens).
    context: int32 [4], the tokens before the chunk in element 0 (an array: the interpreter takes no scalars).
    Returns [T, Hq, D] in q's dtype.
    """
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_pages_t.shape[0]
    if tokens % BLOCK_Q or q_heads % kv_heads or k_pages_t.shape[2:] != (head_dim, PAGE):
        raise ValueError(f"tokens {tokens} must be a multiple of {BLOCK_Q}, query heads {q_heads} of KV heads "
                         f"{kv_heads}, and K pages [Hkv, pages, {head_dim}, {PAGE}]; got {k_pages_t.shape}")
    if v_pages.shape != (kv_heads, k_pages_t.shape[1], PAGE, head_dim) or head_dim % 64:
        raise ValueError(f"V pages must be [Hkv, pages, {PAGE}, head_dim] with head_dim a multiple of 64")
    if block_table.shape[0] % 4 or context.shape != (4,):
        raise ValueError("block_table length must be a multiple of 4 and context an int32 [4]")
    group, dtype = q_heads // kv_heads, q.dtype
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    # Register layouts are hints for the GPU lowering; the interpreter has no rule for them (the values are the same).
    if interpret:
        layout_cast = lambda x, layout: x  # noqa: E731
        iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)  # noqa: E731
    else:
        layout_cast = plgpu.layout_cast
        iota = lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)  # noqa: E731

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
                acc, m, l = carry
                page = table_smem[j]
                plgpu.copy_gmem_to_smem(kt_ref.at[kv_head, page], kt_smem, k_ready)
                plgpu.copy_gmem_to_smem(v_ref.at[kv_head, page], v_smem, v_ready)
                plgpu.barrier_wait(k_ready)

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, kt_smem)
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, PAGE), jnp.float32)) * scale
                rows, cols = iota((BLOCK_Q, PAGE), 0), iota((BLOCK_Q, PAGE), 1)
                s = jnp.where(cols + j * PAGE <= rows + first_position, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                p_smem[...] = p.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(v_ready)

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem)
                    return acc_ref[...]

                pv = pl.run_scoped(values, plgpu.ACC((BLOCK_Q, head_dim), jnp.float32))
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

            acc = layout_cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            row = plgpu.Layout.WGMMA.reduce(1)
            m = layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), row)
            l = layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), row)
            acc, m, l = lax.fori_loop(0, num_tiles, kv_tile, (acc, m, l))
            q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[pl.ds(q_start, BLOCK_Q), head])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((BLOCK_Q, head_dim), dtype, transforms=swizzled),
            plgpu.SMEM((head_dim, PAGE), dtype, transforms=swizzled),
            plgpu.SMEM((PAGE, head_dim), dtype, transforms=swizzled),
            plgpu.SMEM((BLOCK_Q, PAGE), dtype, transforms=swizzled),
            plgpu.SMEM(block_table.shape, jnp.int32),
            plgpu.SMEM((4,), jnp.int32),
            plgpu.Barrier(num_barriers=3),
            collective_axes="wg",
        )

    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams(detect_races=True)
    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype), grid=(q_heads, tokens // BLOCK_Q),
                        grid_names=("heads", "q_tiles"), num_threads=1, thread_name="wg",
                        interpret=interpret or None)  # fmt: skip
    return call(q, k_pages_t, v_pages, block_table, context)


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
    parser.add_argument("--interpret", action="store_true", help="Mosaic GPU interpreter on CPU (small shapes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype, scale = jnp.dtype(args.dtype), args.head_dim**-0.5
    q, k, v, table, context = random_case(args.tokens, args.context, args.q_heads, args.kv_heads, args.head_dim, dtype)
    kt = jnp.swapaxes(k, 2, 3)
    run = jax.jit(lambda q, kt, v, table, context: paged_prefill(q, kt, v, table, context, scale=scale,
                                                                  interpret=args.interpret))  # fmt: skip
    out = run(q, kt, v, table, context).block_until_ready()
    ref = engine_reference(q, k, v, table, args.context, scale)
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    result = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, tokens=args.tokens,
                  context=args.context, dtype=args.dtype, relative_error=err, nan=bool(jnp.isnan(out).any()))
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
