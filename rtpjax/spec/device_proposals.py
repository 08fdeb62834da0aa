"""What model-based proposers (a draft model, an EAGLE-3 head) share to propose for chained verify rounds
(spec/chained.py) on the device.

Such a proposal is queued right after round N, before the host knows N's outcome; the sampler state does: each slot's
token row and count. The host lays out K + 1 rows per sequence from the first position the proposer's cache lacks
(round N added 1 to K + 1 tokens), and the program keeps the rows the count reaches (`resolve`), takes their tokens
from the slot's row, catches the proposer up on them, guesses K tokens from the last and writes them into the slot's
proposal rows (`with_guesses`). Rows past the count write no K/V. When the host reads N, the chained round's item
moves back to start at N's last token: that tells it how far the proposer's cache got (`DeviceProposals.settle`).

`offset`: a draft model runs token p at position p (0); an EAGLE-3 head's row p reads the token at p + 1 (1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rtpjax.runner.step_inputs import SeqChunk, pack


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


class DeviceProposals:
    """A draft model's or EAGLE-3 head's side of chained rounds. The proposer supplies its per-sequence cache states
    (`_state`, `_DraftState`: blocks and `computed`), its host catch-up (`_catch_up`), the rows its program takes
    (`chained_rows(chunks, num_seqs, sink)`), the program (`step`) and what the program reads besides its own cache
    (`extra()`)."""

    def __init__(self, proposer, step, offset: int, seq_buckets: list[int], extra=tuple):
        self.proposer, self.step, self.offset, self.seq_buckets, self.extra = proposer, step, offset, seq_buckets, extra
        self.items = {}  # sequence -> the chained round its latest device proposal is for
        self.programs = {}  # (sequence bucket, placement of the state's rows) -> executable

    def propose(self, state, items):
        """Queue the proposal for a chained round (after round N, before N is read); returns the sampler state with
        the guesses of every item that has room for drafts (the round takes none from the others' rows)."""
        p, k = self.proposer, self.proposer.k
        p.release_finished()
        proposing, chunks, behind = {item.seq for item in items}, [], []
        for item in items:
            if not item.drafts:  # opted out, or at its end
                continue
            seq = item.seq
            start = len(seq.token_ids) - 1 - self.offset  # the first position the cache lacks (N's token is PENDING)
            cached = p._state(seq, proposing, len(seq.token_ids) + 2 * k)  # round N's K + 1, then the guesses
            if cached.computed < start:  # after a round it skipped (or its blocks were taken): the known tokens first
                behind.append([seq, cached, cached.computed, start])
            cached.base, cached.computed, cached.written = start, start, []
            self.items[seq] = item
            chunks.append((cached, SeqChunk([0] * (k + 1), start, cached.blocks), seq))
        if not chunks:
            return state
        list(p._catch_up(behind))  # launched, not read
        num_seqs = next(b for b in self.seq_buckets if b >= len(chunks))
        return self._run(state, num_seqs, p.chained_rows(chunks, num_seqs, _sink(state)))

    def warm(self, state):
        """Compile each sequence bucket's program against the engine's sampler state as its programs leave it, and
        run it once (padding rows only: the sink's row changes); returns the state."""
        for num_seqs in self.seq_buckets:
            state = self._run(state, num_seqs, self.proposer.chained_rows([], num_seqs, _sink(state)))
        return state

    def _run(self, state, num_seqs: int, rows):
        p = self.proposer
        flat, packing = pack(rows)
        placement = tuple(a.sharding for a in jax.tree.leaves(ProposalRows.of(state)))
        program = self.programs.get((num_seqs, placement))
        if program is None:  # at warm-up (or the first chained round without one)
            program = compile_against(self.step, state, p.params, p.cache, self.extra(), flat, packing)
            self.programs[num_seqs, placement] = program
        out, p.cache = program(p.params, p.cache, *self.extra(), ProposalRows.of(state), flat)
        return dataclasses.replace(state, **vars(out))

    def settle(self, seq, computed: int) -> int:
        """The sequence's computed count, moved up to what its latest device proposal caught up on: once the round
        ahead of it was read, its item starts at that round's last token (the item is forgotten then)."""
        item = self.items.pop(seq, None)
        return computed if item is None else max(computed, item.start + 1 - self.offset)

    def drop(self, seq) -> None:
        self.items.pop(seq, None)

    def __len__(self) -> int:
        return len(self.items)


def _sink(state) -> int:
    return state.history_len.shape[0] - 1
