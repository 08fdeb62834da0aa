"""Chained verify rounds: round N+1 is launched before the host has read round N's accepted tokens, so the host's
work between two rounds (reading, scheduling, launching) overlaps the device's, as it does between plain steps.

The host schedules the chained round for the worst case (all of round N's drafts accepted: the blocks are there) and
leaves three things to the device, which has round N's outcome in the sampler state: the round's first token (N's
last accepted one), its drafts (`ngram.device_lookup` over the slot's token row, exactly the host's lookup) and its
positions (the worst case shifted back by what N rejected: positions, K/V slots, context lengths, and the sampling
rows' output positions that key seeded noise). Drafts past the lookup's count write no K/V and are never accepted.
After reading round N, the host moves the chained round's item back the same way (`Scheduler.accept(then=...)`).

A proposer that proposes on the device (`propose_on_device(state, items) -> state`: a program queued after round N,
reading the sampler state N leaves) puts its drafts in the state's `proposals` rows instead, and the chained round
takes them in place of the lookup's (`ChainInputs.from_state`). It must write the row of every item that has room
for drafts (`num_proposals` 0 where it has none): a row it skips holds an earlier round's drafts (an item without
room takes none from its row). Engines whose proposer is not
the lookup (a draft model, an EAGLE-3 head: spec/device_proposals.py) keep the token rows and skip the lookup
(`n_max` 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpjax.kernels.metadata import token_layout
from rtpjax.spec.ngram import device_lookup


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChainInputs:
    """Per sequence of a verify step [S]: which rows are chained, and the lookup's static parameters."""

    slot: jax.Array  # the sequence's sampler slot where chained, else -1 (its drafts came from the host)
    max_drafts: jax.Array  # drafts the host made room for (the lookup's count is capped there)
    num_prompt: jax.Array
    from_state: jax.Array  # 1: the drafts a device proposer left in the sampler state, 0: the n-gram lookup's
    k: int = dataclasses.field(default=1, metadata=dict(static=True))
    n_min: int = dataclasses.field(default=1, metadata=dict(static=True))
    n_max: int = dataclasses.field(default=1, metadata=dict(static=True))  # 0: no lookup, a device proposer's drafts


def _drafts(state, c: ChainInputs):
    """(chained [S], slot [S] (sink where not), known tokens [S], drafts [S, k], count [S])."""
    sink = state.last_token.shape[0] - 1
    chained = c.slot >= 0
    slot = jnp.where(chained, c.slot, sink)
    length = state.history_len[slot]
    if c.n_max:
        drafts, count = device_lookup(state.history[slot], length, c.k, c.n_min, c.n_max)
    else:
        drafts, count = jnp.zeros((slot.shape[0], c.k), jnp.int32), jnp.zeros_like(length)
    if state.proposals.shape[1]:
        given = c.from_state > 0
        drafts = jnp.where(given[:, None], state.proposals[slot, : c.k], drafts)
        count = jnp.where(given, state.num_proposals[slot], count)
    count = jnp.where(chained, jnp.minimum(count, c.max_drafts), 0)
    return chained, slot, length, drafts, count


def resolve_step(batch, state, block_size: int):
    """The model half: a StepBatch whose chained sequences get their tokens, positions and K/V slots from the
    device (the host laid each out as 1 + max_drafts tokens from the worst-case start)."""
    c, meta = batch.chain, batch.meta
    chained, slot, length, drafts, count = _drafts(state, c)
    num_tokens = batch.tokens.shape[0]
    seq, _, valid = token_layout(meta, num_tokens)
    starts = meta.query_start_loc[:-1]
    j = jnp.arange(num_tokens) - starts[seq]  # the token's place in its sequence's chunk
    on = chained[seq] & valid
    delta = jnp.where(chained, length - 1 - batch.positions[jnp.clip(starts, 0, num_tokens - 1)], 0)
    token = jnp.where(j == 0, state.last_token[slot[seq]], drafts[seq, jnp.clip(j - 1, 0, c.k - 1)])
    positions = batch.positions + jnp.where(on, delta[seq], 0)
    cache_slot = meta.block_tables[seq, positions // block_size] * block_size + positions % block_size
    slots = jnp.where(on, jnp.where(j <= count[seq], cache_slot, -1), meta.slot_mapping)
    meta = dataclasses.replace(meta, seq_lens=meta.seq_lens + delta, slot_mapping=slots)
    return dataclasses.replace(batch, tokens=jnp.where(on, token, batch.tokens),
                               token_slot=jnp.where(on, -1, batch.token_slot), positions=positions, meta=meta)


def resolve_verify(v, state):
    """The sampling half: VerifyInputs whose chained sequences get the same drafts and their rows' output positions."""
    c = v.chain
    chained, _, length, drafts, count = _drafts(state, c)
    k = v.drafts.shape[1]
    rows = v.rows
    position = jnp.repeat(length - c.num_prompt, k + 1) + jnp.tile(jnp.arange(k + 1, dtype=jnp.int32), chained.shape[0])
    rows = dataclasses.replace(rows, position=jnp.where(jnp.repeat(chained, k + 1), position, rows.position))
    return dataclasses.replace(v, rows=rows, drafts=jnp.where(chained[:, None], drafts[:, :k], v.drafts),
                               num_drafts=jnp.where(chained, count, v.num_drafts))  # fmt: skip
