"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token's logprob given the tokens before it, and the top
alternatives at each position, for the requests that ask.

The prompt runs once more, outside the engine's steps: in chunks of the token budget, looped on the device, over a
scratch KV cache made inside the executable. Its shapes depend only on the prompt's length bucket (the budget times
powers of two, up to max_model_len), so the runner compiles every bucket at warm-up and scoring never compiles while
serving; memory stays that of one budget-sized chunk's logits plus a cache for the bucket's tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kernels.metadata import AttentionMetadata
from rtpjax.kv import kv_cache as kv
from rtpjax.runner.step_inputs import SeqChunk, build_step
from rtpjax.sampling_params import MAX_LOGPROBS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """A prompt cut into chunks, each a one-sequence step over the scratch cache (leading axis: the chunk)."""

    tokens: jax.Array  # [N, C]
    positions: jax.Array  # [N, C]
    meta: AttentionMetadata  # every array with a leading [N]
    targets: jax.Array  # [N, C] the prompt token after each position (0 past the prompt)
    num_chunks: jax.Array  # [] chunks holding prompt tokens: the loop runs only these


def score_inputs(ids: list[int], length: int, chunk: int, block_size: int, **attention) -> ScoreBatch:
    """Host side: `ids` in `length // chunk` chunks over a scratch cache of `length` tokens (`length`: a multiple of
    `chunk`; chunks past the prompt are padding)."""
    table = list(range(-(-length // block_size)))
    steps = [build_step([SeqChunk(ids[s : s + chunk], s, table)] if s < len(ids) else [], block_size,
                        num_tokens=chunk, num_seqs=1, max_blocks=len(table), **attention)
             for s in range(0, length, chunk)]  # fmt: skip
    targets = np.zeros(length, np.int32)
    targets[: len(ids[1:])] = ids[1:]
    return ScoreBatch(np.stack([s.tokens for s in steps]), np.stack([s.positions for s in steps]),
                      jax.tree.map(lambda *x: np.stack(x), *[s.meta for s in steps]), targets.reshape(-1, chunk),
                      np.int32(-(-len(ids) // chunk)))  # fmt: skip


def score(params, flat, packing, *, cfg, forward, block_size: int, mesh, kv_dtype: str):
    """Device side: (logprob of the next prompt token [N, C], top ids [N, C, K], top logprobs [N, C, K])."""
    batch: ScoreBatch = packing.unpack(flat)
    num, chunk = batch.tokens.shape
    cache = kv.allocate(cfg, batch.meta.block_tables.shape[-1], block_size, mesh=mesh, kv_dtype=kv_dtype)

    def run_chunk(i, carry):
        cache, out = carry
        meta = jax.tree.map(lambda x: x[i], batch.meta)
        logits, cache = forward(params, cfg, batch.tokens[i], batch.positions[i], cache, meta)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
        target = jnp.take_along_axis(logprobs, batch.targets[i][:, None], axis=-1)[:, 0]
        return cache, jax.tree.map(lambda o, x: o.at[i].set(x), out, (target, top_ids, top_lp))

    out = (jnp.zeros((num, chunk), jnp.float32), jnp.zeros((num, chunk, MAX_LOGPROBS), jnp.int32),
           jnp.zeros((num, chunk, MAX_LOGPROBS), jnp.float32))  # fmt: skip
    return jax.lax.fori_loop(0, batch.num_chunks, run_chunk, (cache, out))[1]


def entries(ids: list[int], scored, top_n: int) -> list[dict[int, float] | None]:
    """Host side: per prompt token {its id: logprob, top-n alternatives...}; None for the first (nothing before it)."""
    lp, top_ids, top_lp = (np.asarray(x).reshape(-1, *np.shape(x)[2:]) for x in scored)
    out: list[dict[int, float] | None] = [None]
    for t in range(len(ids) - 1):
        entry = {int(ids[t + 1]): float(lp[t])}
        entry.update((int(i), float(v)) for i, v in zip(top_ids[t, :top_n], top_lp[t, :top_n]))
        out.append(entry)
    return out
