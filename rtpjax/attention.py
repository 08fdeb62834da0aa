"""Paged attention over one ragged token axis: the single interface every model calls.

A step packs many sequences on one token axis: sequence s owns tokens query_start_loc[s]:query_start_loc[s+1], the
last of which sits at context position seq_lens[s] - 1. Its keys and values live in fixed-size blocks of the KV cache
listed by block_tables[s]. The step's new K/V are written into their slots first, then every query attends causally to
its own sequence's cache, so a prefix reused from the cache and freshly computed tokens are read the same way.

`impl` picks the implementation: "reference" is the plain-jnp one below (CPU, and the ground truth for kernels);
GPU kernels register themselves in IMPLEMENTATIONS from rtpjax.pallas_kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from rtpjax.sharding import tensor_ways


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a step belongs. Arrays are padded to bucket sizes; padding is inert.

    query_start_loc: [S+1] int32, token offsets of each sequence (padding sequences repeat the last offset).
    seq_lens:        [S]   int32, context length of each sequence after this step (0 for padding).
    block_tables:    [S, max_blocks] int32, KV cache blocks of each sequence, in order.
    slot_mapping:    [T]   int32, flat cache slot (block * block_size + offset) each token's K/V goes to; -1 for padding.
    impl:            static name of the attention implementation.
    mesh:            static; the device mesh when its "tensor" axis splits the heads: a kernel then runs per shard
                     (shard_map), since XLA cannot split a kernel call and would gather the whole KV cache for it.
    plan:            index arrays derived from the above, by name, made once per step by `plan_step` (else every
                     layer rebuilds them: a few small kernels per layer on the GPU); empty when not made. Derived:
                     metadata with other arrays needs a new plan (`plan_step` again, or `plan={}`).
    """

    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_tables: jax.Array
    slot_mapping: jax.Array
    impl: str = dataclasses.field(default="reference", metadata=dict(static=True))
    plan: dict = dataclasses.field(default_factory=dict)
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))


# A layer's cache: (k, v), each [heads, num_blocks, block_size, head_dim] (heads: kv_cache.cache_heads): one contiguous
# [block_size, head_dim] tile per (head, block), the unit attention kernels load. A quantized (int8 / fp8) cache adds
# (k_scale, v_scale), each [heads, num_blocks, block_size] float32: one scale per token per head.
LayerCache = tuple[jax.Array, ...]

QUANT_MAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-vector quantization over the last axis: x ~= q * scale."""
    qmax = QUANT_MAX[jnp.dtype(dtype)]
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    y = x.astype(jnp.float32) / scale[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        y = round_half_even(jnp.clip(y, -qmax, qmax))
    return y.astype(dtype), scale


def round_half_even(y: jax.Array) -> jax.Array:
    """jnp.round of float32 values in int32 range (not NaN), from truncation: the Triton lowering has no round
    (kv_write), and XLA folds the float adder trick ((y + 1.5 * 2**23) - 1.5 * 2**23) away."""
    whole = y.astype(jnp.int32)  # toward zero
    rest = y - whole.astype(jnp.float32)  # exact, in (-1, 1)
    up = (jnp.abs(rest) > 0.5) | ((jnp.abs(rest) == 0.5) & ((whole & 1) == 1))
    return (whole + jnp.where(up, jnp.where(rest > 0, 1, -1), 0)).astype(jnp.float32)


def dequantize(cache: LayerCache) -> tuple[jax.Array, jax.Array]:
    """Float32 K and V of a layer's cache, whatever its storage type."""
    k, v = cache[0].astype(jnp.float32), cache[1].astype(jnp.float32)
    if len(cache) == 4:
        k, v = k * cache[2][..., None], v * cache[3][..., None]
    return k, v


def write_kv(cache: LayerCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> LayerCache:
    """Scatter the step's K/V ([T, Hkv, D]) into their slots, quantizing for an int8/fp8 cache; slots < 0 dropped.
    Slots must be unique (the scheduler only ever writes a sequence's own new positions)."""
    heads, num_blocks, block_size, dim = cache[0].shape
    num_slots = num_blocks * block_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range -> dropped, never wrapped

    def scatter(buf, new):  # new: [T, H, ...] -> buf[:, slot, ...]
        flat = buf.reshape(heads, num_slots, *buf.shape[3:])
        return flat.at[:, slots].set(new.swapaxes(0, 1).astype(buf.dtype), mode="drop").reshape(buf.shape)

    if len(cache) == 2:
        return scatter(cache[0], k), scatter(cache[1], v)
    (kq, ks), (vq, vs) = quantize(k, cache[0].dtype), quantize(v, cache[1].dtype)
    return scatter(cache[0], kq), scatter(cache[1], vq), scatter(cache[2], ks), scatter(cache[3], vs)


def token_layout(meta: AttentionMetadata, num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each token: its sequence index, its context position, and whether it is a real (non-padding) token."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = meta.seq_lens.shape[0]
    seq = jnp.searchsorted(meta.query_start_loc, t, side="right", method="compare_all")
    seq = jnp.clip(seq - 1, 0, num_seqs - 1)
    query_end = meta.query_start_loc[seq + 1]
    position = meta.seq_lens[seq] - (query_end - t)
    valid = t < meta.query_start_loc[-1]
    return seq, position, valid


def reference_attention(
    q: jax.Array,
    cache: LayerCache,
    meta: AttentionMetadata,
    *,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Plain-jnp paged attention in float32. q: [T, Hq, D] -> [T, Hq, D]; padding tokens give zeros."""
    k_cache, v_cache = dequantize(cache)
    num_tokens, num_heads, dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // kv_heads
    seq, position, valid = meta.plan.get("token_layout") or token_layout(meta, num_tokens)
    if seq.shape != (num_tokens,):
        raise ValueError(f"meta.plan was made for {seq.shape[0]} tokens, this call has {num_tokens}: remake it with "
                         "plan_step when the step's shapes change")  # fmt: skip

    # Every token gathers its own sequence's whole context: simple and exact, not fast.
    blocks = meta.block_tables[seq]  # [T, B]
    slots = (blocks[:, :, None] * block_size + jnp.arange(block_size)[None, None, :]).reshape(num_tokens, -1)
    keys = k_cache.reshape(kv_heads, -1, dim)[:, slots]  # [Hkv, T, C, D]
    values = v_cache.reshape(kv_heads, -1, dim)[:, slots]

    qg = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, dim)
    scores = jnp.einsum("thgd,htcd->thgc", qg, keys) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    key_pos = jnp.arange(keys.shape[2])[None, :]
    visible = key_pos <= position[:, None]
    if window is not None:
        visible &= key_pos > position[:, None] - window
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("thgc,htcd->thgd", probs, values).reshape(num_tokens, num_heads, dim)
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)


def _reference(q, k, v, cache, meta, **kw):
    cache = write_kv(cache, k, v, meta.slot_mapping)
    return reference_attention(q, cache, meta, **kw), cache


def _pallas(q, k, v, cache, meta, **kw):
    """The Triton-lowered kernel; on Hopper the step's long prefill chunks go to the Mosaic GPU one instead (what
    plan_step planned, where the layer suits it), each token's output taken from the kernel that answered it."""
    from jax.sharding import PartitionSpec as P

    from rtpjax.pallas_kernels import kv_write, prefill_mosaic
    from rtpjax.pallas_kernels.ragged_paged_attention import ragged_paged_attention

    def attend(q, k, v, cache, meta):
        interpret, tiles = jax.default_backend() == "cpu", meta.plan.get("prefill_tiles")
        if kv_write.chosen(q.shape[0]):
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
        from rtpjax.pallas_kernels import prefill_mosaic
        from rtpjax.pallas_kernels.ragged_paged_attention import decode_shaped, plan

        steps = {"query_blocks": plan(meta, num_tokens, num_heads, num_kv_heads)}
        # Long chunks to the Mosaic kernel, in steps that can hold them: not in decode-shaped buckets, where it would
        # mostly launch empty tiles every layer.
        decode = decode_shaped(num_tokens, meta.seq_lens.shape[0])
        if num_tokens >= prefill_mosaic.MIN_TOKENS and not decode and prefill_mosaic.available():
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
    return impl(q, k, v, cache, meta, scale=scale, window=window, soft_cap=soft_cap)
