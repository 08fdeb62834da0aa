"""Verifying drafts on the device: sample the target at every drafted position, keep the drafts up to the first one
the target disagrees with, and its own token there (or after the last draft: the bonus token).

Drafts are deterministic guesses (a point mass q per position: n-gram lookups, argmax of a draft model), and the
target's token at each position is drawn exactly as a plain step would draw it: same penalties over the history
(the drafts before it included), same filters, same Gumbel noise keyed by (seed, completion, output position).
Accepting a draft iff it equals that draw is rejection sampling for a point-mass q: accepted with probability
p(d) = min(1, p(d)/q(d)), and a rejected position yields a draw of p conditioned on != d, which is the normalised
residual max(0, p - q). So every request, greedy or sampled, gets the tokens it would get without speculation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpjax.runner.sampler import SampleOutput, SamplerState, SamplingInputs, Variant, append_history, draw
from rtpjax.spec import chained


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyInputs:
    """A verify step's sampling: K+1 rows per sequence, row-major (row j draws the token after draft j)."""

    rows: SamplingInputs  # [S * (K+1)]: each row has its sequence's parameters, its own position and suppression
    drafts: jax.Array  # [S, K] int32, padded with anything past num_drafts
    num_drafts: jax.Array  # [S] int32
    chain: chained.ChainInputs | None = None  # an n-gram engine's: rows whose drafts come from the device


def verify(logits: jax.Array, state: SamplerState, v: VerifyInputs, variant: Variant
           ) -> tuple[SampleOutput, SamplerState]:  # fmt: skip
    """logits [S*(K+1), V] at every drafted position (and the one before the first draft) -> SampleOutput with
    S*(K+1) rows and num_accepted [S]; the kept tokens are recorded into the state."""
    if v.chain is not None:
        v = chained.resolve_verify(v, state)
    num_seqs, k = v.drafts.shape
    vocab = logits.shape[-1]
    s = v.rows
    valid = jnp.arange(k)[None, :] < v.num_drafts[:, None]
    # Row j's penalty history: the sequence's generated tokens so far plus drafts 0..j-1 (which row j follows).
    drafted = jax.nn.one_hot(jnp.where(valid, v.drafts, -1), vocab, dtype=jnp.int32)  # -1: a row of zeros
    history = jnp.concatenate([jnp.zeros((num_seqs, 1, vocab), jnp.int32), jnp.cumsum(drafted, axis=1)], axis=1)
    counts = state.output_counts[s.slot] + history.reshape(num_seqs * (k + 1), vocab)
    out = draw(logits, counts, state.prompt_seen[s.slot] | (counts > 0), s, variant)
    tokens = out.tokens.reshape(num_seqs, k + 1)
    agree = (tokens[:, :k] == v.drafts) & valid
    accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    samples = s.samples.reshape(num_seqs, k + 1)[:, 0]
    kept = samples[:, None] & (jnp.arange(k + 1)[None, :] <= accepted[:, None])
    sink = state.last_token.shape[0] - 1
    row_slot = jnp.where(kept.reshape(-1), s.slot, sink)
    seq_slot = jnp.where(samples, s.slot.reshape(num_seqs, k + 1)[:, 0], sink)
    history, history_len = append_history(state, seq_slot, tokens, kept)
    state = dataclasses.replace(
        state,
        last_token=state.last_token.at[seq_slot].set(jnp.take_along_axis(tokens, accepted[:, None], axis=1)[:, 0]),
        output_counts=state.output_counts.at[row_slot, out.tokens].add(1).at[sink].set(0),
        history=history,
        history_len=history_len,
    )
    return dataclasses.replace(out, num_accepted=accepted, num_drafts=v.num_drafts), state
