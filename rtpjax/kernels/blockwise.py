"""Paged attention in plain jnp that reads only the blocks a step's sequences hold: the engine's path off the GPU.

`reference.reference_attention` gathers every token's whole block table (max_model_len keys per token, padding
included), which is simple and the ground truth, but on a CPU it is the step: its memory and time grow with
max_model_len, not with the context the step has. Here one KV block per sequence per iteration is read, for as many
iterations as the longest context in the step, with an online softmax (flash attention's recurrence) in float32.

A token's result does not depend on what it is batched with: iterations past its own context see only masked keys,
which leave its running max, sum and output bit for bit unchanged (the rescale factor is exactly 1, the added terms
exactly 0), and its own blocks are visited in the same order in every batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtpjax.kernels.metadata import AttentionMetadata, LayerCache, token_layout


def blockwise_attention(q: jax.Array, cache: LayerCache, meta: AttentionMetadata, *, scale: float,
                        window: int | None = None, soft_cap: float | None = None) -> jax.Array:  # fmt: skip
    """q: [T, Hq, D] -> [T, Hq, D], as `reference.reference_attention`; padding tokens give zeros."""
    num_tokens, num_heads, dim = q.shape
    kv_heads, _, block_size, _ = cache[0].shape
    group = num_heads // kv_heads
    seq, position, valid = meta.plan.get("token_layout") or token_layout(meta, num_tokens)
    tables = meta.block_tables[seq]  # [T, B]: each token's own sequence's blocks
    qg = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, dim)
    offsets = jnp.arange(block_size)

    def read(buf, blocks):  # [H, num_blocks, block_size, ...] -> [H, T, block_size, ...] in float32
        return buf[:, blocks].astype(jnp.float32)

    def visit(b, carry):
        running_max, total, out = carry  # [T, Hkv, G], [T, Hkv, G], [T, Hkv, G, D]
        blocks = tables[:, b]
        k, v = read(cache[0], blocks), read(cache[1], blocks)
        if len(cache) == 4:  # int8 / fp8: one scale per token and head
            k, v = k * read(cache[2], blocks)[..., None], v * read(cache[3], blocks)[..., None]
        scores = jnp.einsum("thgd,htcd->thgc", qg, k) * scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        key_pos = b * block_size + offsets[None, :]
        visible = key_pos <= position[:, None]
        if window is not None:
            visible &= key_pos > position[:, None] - window
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)  # nothing visible yet: keep the terms at 0
        rescale = jnp.exp(running_max - shift)
        weights = jnp.exp(scores - shift[..., None])
        out = out * rescale[..., None] + jnp.einsum("thgc,htcd->thgd", weights, v)
        return new_max, total * rescale + weights.sum(axis=-1), out

    shape = (num_tokens, kv_heads, group)
    start = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, dim)))
    steps = -(-jnp.max(meta.seq_lens) // block_size)  # the longest context in the step, in blocks
    _, total, out = jax.lax.fori_loop(0, steps, visit, start)
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return jnp.where(valid[:, None, None], out.reshape(num_tokens, num_heads, dim), 0.0).astype(q.dtype)
