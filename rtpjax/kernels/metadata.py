"""Where each token of a ragged step belongs, and the layout of a layer's paged cache: what every attention
implementation (reference or kernel) reads."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a step belongs. Arrays are padded to bucket sizes; padding is inert.

    query_start_loc: [S+1] int32, token offsets of each sequence (padding sequences repeat the last offset).
    seq_lens:        [S]   int32, context length of each sequence after this step (0 for padding).
    block_tables:    [S, max_blocks] int32, KV cache blocks of each sequence, in order.
    slot_mapping:    [T]   int32, flat cache slot (block * block_size + offset) each token's K/V goes to; -1 for padding.
    impl:            static name of the attention implementation.
    kv_write:        static; how the "pallas" implementation writes the step's K/V: "pallas" (the kernel), "xla"
                     (XLA's scatter) or "auto" (by the step's size, `kv_write.chosen`).
    mosaic_prefill:  static; whether the "pallas" implementation sends long prefill chunks to the Mosaic GPU kernel
                     (on Hopper). Static like impl, so these choices are part of every compiled program's cache key.
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
    kv_write: str = dataclasses.field(default="auto", metadata=dict(static=True))
    mosaic_prefill: bool = dataclasses.field(default=False, metadata=dict(static=True))
    plan: dict = dataclasses.field(default_factory=dict)
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))


# A layer's cache: (k, v), each [heads, num_blocks, block_size, head_dim] (heads: kv_cache.cache_heads): one contiguous
# [block_size, head_dim] tile per (head, block), the unit attention kernels load. A quantized (int8 / fp8) cache adds
# (k_scale, v_scale), each [heads, num_blocks, block_size] float32: one scale per token per head.
LayerCache = tuple[jax.Array, ...]


def is_simulated(cache: LayerCache) -> bool:
    """KV-precision calibration's stand-in for a per-layer cache dtype: (k, v, mode), float32 buffers and a traced
    int32 mode whose round trip (`reference.round_trip`) every write goes through."""
    return len(cache) == 3


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
