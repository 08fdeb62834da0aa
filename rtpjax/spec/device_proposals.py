"""What model-based proposers (a draft model, an EAGLE-3 head) share to propose for chained verify rounds
(spec/chained.py) on the device.

Such a proposal is queued right after round N, before the host knows N's outcome; the sampler state does: each slot's
token row and count. The host lays out K + 1 rows per sequence from the first position the proposer's cache lacks
(round N added 1 to K + 1 tokens), and the program keeps the rows the count reaches (`resolve`), takes their tokens
from the slot's row, catches the proposer up on them, guesses K tokens from the last and writes them into the slot's
proposal rows (`with_guesses`). Rows past the count write no K/V. When the host reads N, the chained round's item
moves back to start at N's last token: that tells it how far the proposer's cache got (`ChainedItems`).

`offset`: a draft model runs token p at position p (0); an EAGLE-3 head's row p reads the token at p + 1 (1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProposalRows:
    """The sampler state's rows a chained proposal reads and writes (only these: the rest keeps the placement the
    engine's programs gave it)."""

    history: jax.Array
    history_len: jax.Array
    proposals: jax.Array
    num_proposals: jax.Array

    @classmethod
    def of(cls, state) -> "ProposalRows":
        return cls(state.history, state.history_len, state.proposals, state.num_proposals)


@dataclasses.dataclass(frozen=True)
class Resolved:
    valid: jax.Array  # [T] rows the sequence's count reaches
    positions: jax.Array  # [T] their positions (0 elsewhere)
    tokens: jax.Array  # [T] their tokens
    last: jax.Array  # [S] each sequence's last real row, whose output guesses
    lens: jax.Array  # [S] where the guesses go on from (0 for padding sequences)


def resolve(positions, real, slot, state: ProposalRows, k: int, offset: int) -> Resolved:
    """positions [S * (K + 1)]: the host's layout; real [S]: sequences that are not padding; slot [S]: their slots."""
    num_seqs = slot.shape[0]
    length = jnp.where(real, state.history_len[slot], 0)  # the sequence's tokens, round N's included
    seq = jnp.minimum(jnp.arange(positions.shape[0]) // (k + 1), num_seqs - 1)
    valid = real[seq] & (positions <= length[seq] - 1 - offset)
    p = jnp.where(valid, positions, 0)
    tokens = state.history[slot[seq], jnp.minimum(p + offset, state.history.shape[1] - 1)]
    first = jnp.arange(num_seqs) * (k + 1)
    last = first + jnp.clip(length - 1 - offset - positions[first], 0, k)
    return Resolved(valid, p, tokens, last, jnp.where(real, length - offset, 0))


def with_guesses(state: ProposalRows, slot, real, guesses) -> ProposalRows:
    """Each real sequence's K guesses [S, K] into its slot's proposal row (padding sequences write the sink's)."""
    k = guesses.shape[1]
    return dataclasses.replace(state, proposals=state.proposals.at[slot, :k].set(guesses),
                               num_proposals=state.num_proposals.at[slot].set(jnp.where(real, k, 0)))  # fmt: skip


def compile_against(fn, state, params, cache, extra: tuple, flat, packing):
    """`fn(params, cache, *extra, rows, flat, packing) -> (rows, cache)` compiled against the engine's sampler state
    as its programs leave it: it must take exactly that placement, and gives rows and cache back placed as they came
    (both donated)."""
    rows = ProposalRows.of(state)
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), rows)
    at = 2 + len(extra)  # where rows go
    step = jax.jit(fn, static_argnums=(at + 2,), donate_argnums=(1, at),
                   out_shardings=jax.tree.map(lambda a: a.sharding, (rows, cache)))  # fmt: skip
    return step.lower(params, cache, *extra, spec, flat, packing).compile()


def run(program, state, params, cache, extra: tuple, flat):
    """(the sampler state with the program's guesses, the proposer's cache)."""
    rows, cache = program(params, cache, *extra, ProposalRows.of(state), flat)
    return dataclasses.replace(state, **vars(rows)), cache


class ChainedItems:
    """Which chained round each sequence's latest device proposal is for: once the round ahead of it is read, the
    item starts at that round's last token, and the proposer's cache holds what came before (less `offset`)."""

    def __init__(self, offset: int):
        self.offset, self.items = offset, {}

    def note(self, seq, item) -> None:
        self.items[seq] = item

    def computed(self, seq, computed: int) -> int:
        """The sequence's computed count, moved up to what its latest device proposal caught up on."""
        item = self.items.pop(seq, None)
        return computed if item is None else max(computed, item.start + 1 - self.offset)

    def drop(self, seq) -> None:
        self.items.pop(seq, None)

    def __len__(self) -> int:
        return len(self.items)
