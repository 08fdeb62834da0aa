"""Ragged paged attention in Pallas (Triton lowering): prefill chunks and decode tokens of many sequences at once.

Work is cut into query blocks: `block_q` consecutive tokens of one sequence times the (power-of-two padded) query
heads that share one KV head, so every block is a [block_q * G, head_dim] matrix however ragged the batch is. A program
owns one (KV head, query block, KV split); it walks its sequence's block table `pages_per_tile` pages at a time, with
an online softmax, and stops at the causal limit of its last token (and starts at the window of its first). With more
than one KV split (long contexts, few sequences), partial results are merged outside the kernel.

A tile is gathered as token rows of a flat [blocks * block_size, head_dim] view of the cache (each row's slot from the
block table), not as [pages, block_size, head_dim] reshaped in the kernel: the reshape cost Triton a trip through
shared memory per tile, and the row gather measured 1.5-1.6x faster at decode (benchmarks/RESULTS.md).

An int8 / fp8 cache brings a float32 scale per token per head: keys are dequantized through the logits, values
through the probabilities, so the cache is read at its stored width. An fp8 tile becomes float16 (Hopper converts
e4m3 pairs to float16 in one instruction, to bfloat16 only through float32), so its queries and probabilities are
float16 too, the queries scaled first. int8 becomes float16 pairs by inline PTX (`kv_unpack="asm"`,
`rtpjax.kernels.ptx`: five instructions per four elements, no integer-to-float conversion), its queries then as fp8's;
the default for 16-bit queries wherever the GPU runs it. Over two H100 runs it timed 0.96-1.21x the conversion to
the queries' dtype (`kv_unpack="convert"`, the default elsewhere; an exact float16 bit trick in jnp measured slower
than both), benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rtpjax.kernels import SMS, ptx
from rtpjax.kernels.metadata import AttentionMetadata

MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(MASK - real max) == 0 with no inf - inf
KV_UNPACKS = ("convert", "asm")


def _dot(a, b, trans_b: bool = False):
    """a @ b (or a @ b.T) with float32 accumulation: the tensor-core product inside the kernel."""
    contract = ((1,), (1 if trans_b else 0,))
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _kernel(
    qb_seq_ref, qb_start_ref, qb_rows_ref, qsl_ref, seq_lens_ref, tables_ref,  # scheduling, int32
    q_ref, k_ref, v_ref, *rest,
    block_q: int, group: int, page_size: int, pages_per_tile: int, max_pages: int, num_splits: int, scale: float,
    window: int | None, soft_cap: float | None, quantized: bool, int8_pairs: bool, interpret: bool,
):  # fmt: skip
    if quantized:
        k_scale_ref, v_scale_ref, *outs = rest
    else:
        k_scale_ref = v_scale_ref = None
        outs = rest
    o_ref = outs[0]
    qb, split = pl.program_id(1), pl.program_id(2)
    seq, t0, rows = qb_seq_ref[qb], qb_start_ref[qb], qb_rows_ref[qb]
    first_pos = seq_lens_ref[seq] - qsl_ref[seq + 1] + t0  # context position of the block's first token
    m_rows = block_q * group
    head_dim = k_ref.shape[-1]
    tile = pages_per_tile * page_size

    q = q_ref[pl.ds(t0, block_q), :, :].reshape(m_rows, head_dim)
    f16 = k_ref.dtype == jnp.float8_e4m3fn or int8_pairs
    if f16:  # scaled first: the float16 range holds q * scale of any real model
        q = jnp.clip(q.astype(jnp.float32) * scale, -6e4, 6e4).astype(jnp.float16)
    row_pos = first_pos + lax.broadcasted_iota(jnp.int32, (m_rows, tile), 0) // group
    key_iota = lax.broadcasted_iota(jnp.int32, (m_rows, tile), 1)

    # Tiles [lo, hi) of this sequence that any row of the block may see, split evenly among the KV splits.
    hi = jnp.where(rows > 0, pl.cdiv(first_pos + rows, tile), 0)
    lo = 0 if window is None else jnp.maximum(first_pos - window + 1, 0) // tile
    lo = jnp.minimum(lo, hi)
    per_split = pl.cdiv(hi - lo, num_splits)
    start = jnp.minimum(lo + split * per_split, hi)
    end = jnp.minimum(start + per_split, hi)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        pos = j * tile + lax.broadcasted_iota(jnp.int32, (tile,), 0)
        slots = tables_ref[seq * max_pages + pos // page_size] * page_size + pos % page_size
        k, v = k_ref[slots], v_ref[slots]  # [tile, head_dim]
        if int8_pairs:  # (interpreted: no PTX, the same exact values)
            k, v = (x.astype(jnp.float16) if interpret else ptx.int8_to_f16(x) for x in (k, v))
        elif quantized:
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        logits = _dot(q, k, trans_b=True)  # [m_rows, tile] float32
        if not f16:
            logits = logits * scale
        if quantized:
            logits = logits * k_scale_ref[slots][None, :]
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        key_pos = j * tile + key_iota
        visible = key_pos <= row_pos
        if window is not None:
            visible = visible & (key_pos > row_pos - window)
        logits = jnp.where(visible, logits, MASK)
        m_next = jnp.maximum(m_prev, logits.max(axis=-1))
        correction = jnp.exp2((m_prev - m_next) * math.log2(math.e))
        p = jnp.exp2((logits - m_next[:, None]) * math.log2(math.e))
        l_next = l_prev * correction + p.sum(axis=-1)
        if quantized:  # the tile's largest scale goes outside the dot: p * scale can underflow float16
            v_scale = v_scale_ref[slots]
            v_max = jnp.max(v_scale)
            v_max = jnp.where(v_max > 0, v_max, 1.0)  # a tile of unwritten slots: all masked
            pv = _dot((p * (v_scale / v_max)[None, :]).astype(v.dtype), v) * v_max
        else:
            pv = _dot(p.astype(v.dtype), v)
        acc = acc * correction[:, None] + pv
        return acc, m_next, l_next

    init = (
        jnp.zeros((m_rows, head_dim), jnp.float32),
        jnp.full((m_rows,), MASK, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(start, end, body, init)

    row_ok = lax.broadcasted_iota(jnp.int32, (block_q, group, head_dim), 0) < rows
    rows_here = pl.ds(t0, block_q)
    if num_splits == 1:
        out = (acc / jnp.where(l == 0, 1.0, l)[:, None]).reshape(block_q, group, head_dim)
        plgpu.store(o_ref.at[rows_here], out.astype(o_ref.dtype), mask=row_ok)
    else:
        m_ref, l_ref = outs[1], outs[2]
        plgpu.store(o_ref.at[rows_here], acc.reshape(block_q, group, head_dim), mask=row_ok)
        stat_ok = lax.broadcasted_iota(jnp.int32, (block_q, group), 0) < rows
        plgpu.store(m_ref.at[rows_here], m.reshape(block_q, group), mask=stat_ok)
        plgpu.store(l_ref.at[rows_here], l.reshape(block_q, group), mask=stat_ok)


def decode_shaped(num_tokens: int, num_seqs: int) -> bool:
    """A bucket of about one token per sequence: bandwidth-bound, wanting small tiles (and no prefill kernel)."""
    return num_tokens <= 2 * num_seqs


def decode_splits(programs: int, pairs: int, kv_dtype) -> int:
    """KV splits of a decode-shaped step by default: few (sequence, KV head) pairs split long contexts to fill the
    GPU's SMs. An int8 cache's pairs between two and four per SM take two: one split measured slower there (64
    sequences), while at 32 and 128 two gained nothing (RESULTS.md, H100 12-06b and 12-06c; fp8 showed no dip)."""
    splits = max(1, min(16, 512 // programs))
    if jnp.dtype(kv_dtype) == jnp.int8 and 2 * SMS < pairs <= 4 * SMS:
        splits = max(splits, 2)
    return splits


def default_block_q(num_tokens: int, num_seqs: int, num_heads: int, kv_heads: int) -> int:
    """Query tokens per block. Decode-shaped batches (about one token per sequence) are bandwidth-bound: small
    blocks; prefill wants 128-row blocks (benchmarks/kernels/sweep.py, benchmarks/RESULTS.md)."""
    decode = decode_shaped(num_tokens, num_seqs)
    return max(1, (16 if decode else 128) // pl.next_power_of_2(num_heads // kv_heads))


def plan(meta: AttentionMetadata, num_tokens: int, num_heads: int, kv_heads: int, skip=None) -> tuple:
    """The step's query blocks for the default block size, made once for all layers (rtpjax.kernels.attention.plan_step);
    sequences marked in `skip` ([S] bool) get none (another kernel answers them)."""
    block_q = default_block_q(num_tokens, meta.seq_lens.shape[0], num_heads, kv_heads)
    return query_blocks(meta, num_tokens, block_q, skip)


def query_blocks(meta: AttentionMetadata, num_tokens: int, block_q: int, skip=None, num_blocks: int | None = None):
    """(sequence, first token, valid rows) of every query block; spare blocks have 0 rows. Static count (by default
    enough for any step of `num_tokens`). Sequences marked in `skip` get no blocks: their tokens' outputs are left
    unwritten."""
    num_seqs = meta.seq_lens.shape[0]
    num_blocks = num_blocks or pl.cdiv(num_tokens, block_q) + num_seqs
    qsl = meta.query_start_loc
    lens = qsl[1:] - qsl[:-1]
    per_seq = (lens + block_q - 1) // block_q
    if skip is not None:
        per_seq = jnp.where(skip, 0, per_seq)
    ends = jnp.cumsum(per_seq)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # compare_all: one vectorized comparison; the default binary search is a loop, slow on GPU for tiny arrays
    seq = jnp.searchsorted(ends, b, side="right", method="compare_all")
    seq = jnp.minimum(seq, num_seqs - 1).astype(jnp.int32)
    local = b - (ends[seq] - per_seq[seq])
    start = qsl[seq] + local * block_q
    rows = jnp.where(b < ends[-1], jnp.clip(qsl[seq + 1] - start, 0, block_q), 0)
    return seq, jnp.where(rows > 0, start, 0).astype(jnp.int32), rows.astype(jnp.int32)


def default_kv_unpack(q_dtype) -> str:
    """An int8 cache's tiles go to float16 pairs by PTX for 16-bit queries wherever this process's GPU runs it, else
    by conversion: float32 queries keep float32 tiles (the PTX path takes queries and probabilities to float16)."""
    sixteen_bit = jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "asm" if sixteen_bit and ptx.runs(jnp.float16) else "convert"


def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    cache: tuple,  # (k, v) or (k, v, k_scale, v_scale); k, v: [Hkv, num_blocks, block_size, D]
    meta: AttentionMetadata,
    *,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    pages_per_tile: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    kv_unpack: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of every token to its own sequence's cached context. Padding tokens give zeros. `kv_unpack`: how an
    int8 cache's tiles become floats, "convert" or "asm" (module docstring; None: `default_kv_unpack`)."""
    k_cache, v_cache = cache[0], cache[1]
    quantized = len(cache) == 4
    kv_unpack = kv_unpack or default_kv_unpack(q.dtype)
    if kv_unpack not in KV_UNPACKS:
        raise ValueError(f"ragged_paged_attention: kv_unpack {kv_unpack!r}: choose of {', '.join(KV_UNPACKS)}")
    num_tokens, num_heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_cache.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"ragged_paged_attention needs head_dim a power of two >= 16 (tensor-core dots), got {head_dim}")
    group = num_heads // kv_heads
    group_p = pl.next_power_of_2(group)
    # Defaults from benchmarks/kernels/sweep.py and benchmarks/kernels/attention_bench.py (benchmarks/RESULTS.md):
    # decode-shaped batches want small tiles and shallow pipelines, prefill 128-token tiles, 8 warps and deep pipelines.
    decode = decode_shaped(num_tokens, meta.seq_lens.shape[0])
    blocks = meta.plan.get("query_blocks") if block_q is None else None  # the step's plan: default-sized blocks
    if block_q is None:
        block_q = default_block_q(num_tokens, meta.seq_lens.shape[0], num_heads, kv_heads)
    if blocks is None:
        blocks = query_blocks(meta, num_tokens, block_q)
    if blocks[0].shape != (pl.cdiv(num_tokens, block_q) + meta.seq_lens.shape[0],):
        raise ValueError(f"meta.plan holds {blocks[0].shape[0]} query blocks; this call needs block_q={block_q}: "
                         "make it with rtpjax.kernels.attention.plan_step for this step's shapes")  # fmt: skip
    if num_splits is None:
        programs = kv_heads * (pl.cdiv(num_tokens, block_q) + meta.seq_lens.shape[0])
        num_splits = decode_splits(programs, kv_heads * meta.seq_lens.shape[0], k_cache.dtype) if decode else 1
    if pages_per_tile is None:
        pages_per_tile = max(1, (64 if decode and not quantized else 128) // page_size)
    if num_warps is None:
        num_warps = 4 if decode else 8
    if num_stages is None:
        num_stages = 2 if decode and not quantized else 3

    # [T, Hq, D] -> [Hkv, T + block_q, G_pow2, D]: one KV head's queries are rows of one matrix.
    qh = q.reshape(num_tokens, kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qh = jnp.pad(qh, ((0, 0), (0, block_q), (0, group_p - group), (0, 0)))
    padded_tokens = num_tokens + block_q
    tables = meta.block_tables
    tables = jnp.pad(tables, ((0, 0), (0, -tables.shape[1] % pages_per_tile)))
    max_pages = tables.shape[1]
    tables = tables.reshape(-1)
    # Flat views, one token row per slot (free reshapes of the contiguous cache).
    cache = tuple(c.reshape(kv_heads, -1, *c.shape[3:]) for c in cache)
    k_cache, v_cache = cache[0], cache[1]
    qb_seq, qb_start, qb_rows = blocks
    grid = (kv_heads, qb_seq.shape[0], num_splits)

    whole = lambda shape: pl.BlockSpec(shape, lambda h, b, s: (0,) * len(shape))  # noqa: E731
    per_head = lambda shape: pl.BlockSpec((None, *shape), lambda h, b, s: (h,) + (0,) * len(shape))  # noqa: E731
    cache_spec = per_head(k_cache.shape[1:])
    in_specs = [whole(qb_seq.shape), whole(qb_start.shape), whole(qb_rows.shape), whole(meta.query_start_loc.shape),
                whole(meta.seq_lens.shape), whole(tables.shape), per_head(qh.shape[1:]), cache_spec, cache_spec]  # fmt: skip
    inputs = [qb_seq, qb_start, qb_rows, meta.query_start_loc, meta.seq_lens, tables, qh, k_cache, v_cache]
    if quantized:
        in_specs += [per_head(cache[2].shape[1:])] * 2
        inputs += [cache[2], cache[3]]

    out_rows = (padded_tokens, group_p)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((kv_heads, *out_rows, head_dim), q.dtype)]
        out_specs = [per_head((*out_rows, head_dim))]
    else:
        per_split = lambda shape: pl.BlockSpec((None, None, *shape), lambda h, b, s: (s, h) + (0,) * len(shape))  # noqa: E731
        out_shape = [jax.ShapeDtypeStruct((num_splits, kv_heads, *out_rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, kv_heads, *out_rows), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, kv_heads, *out_rows), jnp.float32)]  # fmt: skip
        out_specs = [per_split((*out_rows, head_dim)), per_split(out_rows), per_split(out_rows)]

    kernel = functools.partial(
        _kernel, block_q=block_q, group=group_p, page_size=page_size, pages_per_tile=pages_per_tile,
        max_pages=max_pages, num_splits=num_splits, scale=scale, window=window, soft_cap=soft_cap, quantized=quantized,
        int8_pairs=quantized and k_cache.dtype == jnp.int8 and kv_unpack == "asm", interpret=interpret,
    )  # fmt: skip
    compiler_params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params, interpret=interpret, name="ragged_paged_attention",
    )(*inputs)  # fmt: skip

    if num_splits == 1:
        out = outs[0]
    else:  # merge the splits' partial softmaxes
        acc, m, l = outs
        m_max = m.max(axis=0)
        w = jnp.exp(m - m_max[None])
        denom = (w * l).sum(axis=0)
        out = (w[..., None] * acc).sum(axis=0) / jnp.where(denom == 0, 1.0, denom)[..., None]
    out = out[:, :num_tokens, :group].transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim)
    valid = jnp.arange(num_tokens) < meta.query_start_loc[-1]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
