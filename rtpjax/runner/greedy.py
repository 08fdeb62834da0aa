"""Greedy decoding of one sequence straight through a model function and the paged KV cache.

The shortest end-to-end path from token ids to token ids, for research scripts and as the reference the batching
engine is checked against. Prefill is one step (or chunks of `chunk` tokens); each new token is one decode step.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import numpy as np

from rtpjax.kv import kv_cache
from rtpjax.runner.step_inputs import SeqChunk, build_step


@functools.cache
def jit_forward(family):
    """The family's forward, jitted with the config static and the KV cache donated (updated in place)."""
    return jax.jit(family.forward, static_argnames=("cfg",), donate_argnames=("kv_cache",))


def greedy_tokens(
    params, cfg, family, prompt: list[int], max_new_tokens: int, *, block_size: int = 16, chunk: int | None = None,
    stop_ids: tuple[int, ...] = (), kv_dtype: str | tuple[str, ...] = "auto",
) -> Iterator[int]:  # fmt: skip
    """Yield up to `max_new_tokens` greedy tokens after `prompt`, stopping after any of `stop_ids` (kv_dtype: the
    cache's dtype, or one per layer)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    total = len(prompt) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"{total} tokens exceed the model's {cfg.max_position_embeddings} positions")
    num_blocks = -(-total // block_size)
    cache = kv_cache.allocate(cfg, num_blocks, block_size, kv_dtype=kv_dtype)
    table = list(range(num_blocks))
    forward = jit_forward(family)

    def step(tokens: list[int], start: int, num_tokens: int):
        nonlocal cache
        inputs = build_step([SeqChunk(tokens, start, table)], block_size, num_tokens=num_tokens)
        logits, cache = forward(
            params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta, inputs.logits_indices
        )
        return int(np.argmax(np.asarray(logits[0])))

    size = chunk or len(prompt)
    for start in range(0, len(prompt), size):
        token = step(prompt[start : start + size], start, size)  # the last chunk is padded to the same shape
    for i in range(max_new_tokens):
        yield token
        if token in stop_ids or i == max_new_tokens - 1:
            return
        token = step([token], len(prompt) + i, 1)
