"""Paged attention over one ragged token axis: the single interface every model calls.

A step packs many sequences on one token axis: sequence s owns tokens query_start_loc[s]:query_start_loc[s+1], the
last of which sits at context position seq_lens[s] - 1. Its keys and values live in fixed-size blocks of the KV cache
listed by block_tables[s]. The step's new K/V are written into their slots first, then every query attends causally to
its own sequence's cache, so a prefix reused from the cache and freshly computed tokens are read the same way.

`impl` picks the implementation: "reference" is plain jnp (the CPU path: `blockwise`, which reads only the blocks a
step's sequences hold, tested against `reference.reference_attention`, the ground truth of every kernel); "pallas"
runs the Pallas kernels of this package (interpreted on CPU: for tests).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from rtpjax.kernels import kv_write, prefill_mosaic
from rtpjax.kernels.metadata import AttentionMetadata, LayerCache, is_simulated, token_layout
from rtpjax.kernels.ragged_paged_attention import decode_shaped, plan, ragged_paged_attention
from rtpjax.kernels.blockwise import blockwise_attention
from rtpjax.kernels.reference import round_trip, write_kv
from rtpjax.parallel.sharding import tensor_ways


def _reference(q, k, v, cache, meta, **kw):
    cache = write_kv(cache, k, v, meta.slot_mapping)
    return blockwise_attention(q, cache, meta, **kw), cache


def _pallas(q, k, v, cache, meta, **kw):
    """The Triton-lowered kernel; on Hopper the step's long prefill chunks go to the Mosaic GPU one instead (what
    plan_step planned, where the layer suits it), each token's output taken from the kernel that answered it."""
    from jax.sharding import PartitionSpec as P


    def attend(q, k, v, cache, meta):
        interpret, tiles = jax.default_backend() == "cpu", meta.plan.get("prefill_tiles")
        if kv_write.chosen(q.shape[0], meta.kv_write):
            cache = kv_write.write_kv(cache, k, v, meta.slot_mapping, interpret=interpret)
        else:
            cache = write_kv(cache, k, v, meta.slot_mapping)
        tables = meta.block_tables
        if tiles is None or not prefill_mosaic.supports(q, cache, kw["window"], kw["soft_cap"], tables.shape[1]):
            return ragged_paged_attention(q, cache, meta, interpret=interpret, **kw), cache
        rest = dataclasses.replace(meta, plan={"query_blocks": meta.plan["other_query_blocks"]})
        out = ragged_paged_attention(q, cache, rest, interpret=interpret, **kw)
        long = prefill_mosaic.prefill_attention(q, cache, tables, tiles, scale=kw["scale"], interpret=interpret)
        return jnp.where(tiles["mine"][:, None, None], long, out), cache

    ways = tensor_ways(meta.mesh)
    if ways == 1 or cache[0].shape[0] % ways:  # one device, or a cache whose heads do not split over the devices
        return attend(q, k, v, cache, meta)
    heads, cache_heads = P(None, "tensor"), (P("tensor"),) * len(cache)  # [T, H, D]; [Hkv, ...]
    return jax.shard_map(attend, mesh=meta.mesh, in_specs=(heads, heads, heads, cache_heads, P()),
                         out_specs=(heads, cache_heads), check_vma=False)(q, k, v, cache, meta)  # fmt: skip


# name -> fn(q, k, v, cache, meta, *, scale, window, soft_cap) -> (out, cache). "pallas" runs the Pallas kernel
# (interpreted on CPU, which is slow: for tests); "auto" picks pallas on GPU and reference elsewhere.
IMPLEMENTATIONS: dict[str, Callable] = {"reference": _reference, "pallas": _pallas}


def plan_step(meta: AttentionMetadata, num_tokens: int, num_heads: int, num_kv_heads: int) -> AttentionMetadata:
    """`meta` with its implementation's per-step index arrays, for a model to make once before its layers."""
    if meta.impl == "pallas":
        steps = {"query_blocks": plan(meta, num_tokens, num_heads, num_kv_heads)}
        # Long chunks to the Mosaic kernel, in steps that can hold them: not in decode-shaped buckets, where it would
        # mostly launch empty tiles every layer.
        decode = decode_shaped(num_tokens, meta.seq_lens.shape[0])
        long_chunks = num_tokens >= prefill_mosaic.MIN_TOKENS and not decode
        if meta.mosaic_prefill and long_chunks and prefill_mosaic.available():
            steps["prefill_tiles"] = prefill_mosaic.plan(meta, num_tokens)
            skip = prefill_mosaic.prefills(meta)
            steps["other_query_blocks"] = plan(meta, num_tokens, num_heads, num_kv_heads, skip=skip)
        return dataclasses.replace(meta, plan=steps)
    return dataclasses.replace(meta, plan={"token_layout": token_layout(meta, num_tokens)})


def kernel_supports(head_dim: int) -> bool:
    """The Pallas kernel's tensor-core dots need head_dim a power of two of at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def resolve_impl(name: str, head_dim: int) -> str:
    """"auto": the Pallas kernel on GPU where it supports the model's head_dim, the plain-jnp reference otherwise."""
    if name == "auto":
        return "pallas" if jax.default_backend() == "gpu" and kernel_supports(head_dim) else "reference"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose auto or one of {sorted(IMPLEMENTATIONS)}")
    if name == "pallas" and not kernel_supports(head_dim):
        raise ValueError(f"attention_impl='pallas' needs head_dim a power of two >= 16, this model has {head_dim}; "
                         "use 'reference' or 'auto'")  # fmt: skip
    return name


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: LayerCache,
    meta: AttentionMetadata,
    *,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
) -> tuple[jax.Array, LayerCache]:
    """Write this step's K/V ([T, Hkv, D]) into the cache, then attend. Returns ([T, Hq, D], updated cache).

    A cache holding each KV head several times (KV heads that do not split over the tensor-parallel devices:
    `kv_cache.cache_heads`) gets every copy written; query head h reads cache head h // (Hq / cache heads), a copy of
    its own KV head.
    """
    try:
        impl = IMPLEMENTATIONS[meta.impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {meta.impl!r}; have {sorted(IMPLEMENTATIONS)}") from None
    copies, extra = divmod(cache[0].shape[0], k.shape[1])
    if extra or q.shape[1] % cache[0].shape[0]:
        raise ValueError(f"a cache of {cache[0].shape[0]} heads cannot serve {q.shape[1]} query heads over "
                         f"{k.shape[1]} KV heads")  # fmt: skip
    if copies > 1:
        k, v = jnp.repeat(k, copies, axis=1), jnp.repeat(v, copies, axis=1)
    if is_simulated(cache):  # kv_precision's calibration: the cache dtype is a traced mode
        mode = cache[2]
        out, kv = impl(q, round_trip(k, mode), round_trip(v, mode), cache[:2], meta, scale=scale, window=window,
                       soft_cap=soft_cap)  # fmt: skip
        return out, (*kv, mode)
    return impl(q, k, v, cache, meta, scale=scale, window=window, soft_cap=soft_cap)
