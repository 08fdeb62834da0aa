"""EAGLE-3 proposals: a one-layer head reads the target's own hidden states and guesses the next K tokens greedily.

After every target step the engine hands the step's aux hidden states ([T, 3H], the inputs of three target layers,
computed only in engines with this proposer) to `observe`, which folds them through the head's `fc` into one
feature per token and writes each into a feature store indexed like the target's KV cache (block * block_size +
offset): rejected drafts' features are overwritten when their positions are computed again, as their K/V are, and a
prefix-cache hit finds the features of the sequence that filled the block. (Blocks restored from KV tiers come back
without theirs: the head then reads stale features, which lowers acceptance, never correctness.)

Row p of the head reads the token at p + 1 and the target's feature at p, so it predicts the token at p + 2; a
proposal catches the head's paged KV up on the rows whose features arrived since its last one (up to the sequence's
second-to-last token, whose row guesses the next token), then chains K - 1 guesses, each feeding the layer's own
output back as the feature. Chained rows' K/V are rewritten by the next catch-up, which uses the target's features.
All in one jitted program per token bucket, compiled at construction like the draft model's (draft_model.py, whose
block bookkeeping and chaining this shares). Proposals are argmaxes, so `runner.verify` keeps the target's
distribution exactly whatever the head's weights.

Chained verify rounds (spec/chained.py) take the head's guesses from the device (spec/device_proposals.py):
`propose_on_device` queues, right after round N, the same catch-up and guesses over rows resolved against the
sampler state N leaves.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rtpjax.engine.sequence import Sequence
from rtpjax.kv import kv_cache as kv
from rtpjax.kv.block_pool import BlockPool
from rtpjax.models import layers
from rtpjax.runner.step_inputs import Packing, SeqChunk, build_step, pack
from rtpjax.spec import eagle3_head as head_lib
from rtpjax.spec.device_proposals import DeviceProposals, ProposalRows, resolve, with_guesses
from rtpjax.spec.draft_model import (DraftBatch, DraftContext, DraftModelProposer, _DraftState, calls_within_budget,
                                     chained, reserve)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EagleBatch:
    rows: DraftBatch  # the tokens at p + 1 and positions p of the rows to catch up on, ragged
    feature_slots: jax.Array  # [T] where each row's feature lies in the store (0 for padding rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChainedRows:
    """A chained round's catch-up, laid out by the host before the round ahead is read: K + 1 rows per sequence from
    the first one the head lacks (positions and head cache slots); tokens, feature slots, which rows are real and
    where the guessing starts come from the sampler state on the device."""

    rows: EagleBatch
    slot: jax.Array  # [S] each sequence's sampler slot (padding: the sink)
    target_tables: jax.Array  # [S, target blocks]: where the target's features of a sequence's positions lie


def guess(params, cache, features, e: EagleBatch, *, cfg, k: int, block_size: int, lens=None):
    """Catch up on the rows, then K greedy guesses per sequence from each one's `last` row: ([S, K] int32, cache).
    lens: the sequences' lengths less one, where the guesses go on from (default: the rows' context lengths)."""
    b = e.rows
    hidden, layer_cache = head_lib.layer(params, cfg, params["embed"][b.tokens], features[e.feature_slots],
                                         b.positions, cache[0], b.meta)  # fmt: skip
    hidden = hidden[b.last]
    if lens is not None:
        b = dataclasses.replace(b, meta=dataclasses.replace(b.meta, seq_lens=lens))
    guesses = [head_lib.draft_tokens(params, cfg, hidden)]
    for j in range(k - 1):  # guess j + 1 sits at len + j, read off guess j and the layer's last output
        pos, meta = chained(b, j, block_size)
        hidden, layer_cache = head_lib.layer(params, cfg, params["embed"][guesses[-1]], hidden, pos, layer_cache, meta)
        guesses.append(head_lib.draft_tokens(params, cfg, hidden))
    return jnp.stack(guesses, axis=1), [layer_cache]


def propose_step(params, cache, features, flat, packing: Packing, *, cfg, k: int, block_size: int):
    """`guess` over an EagleBatch laid out on the host."""
    return guess(params, cache, features, packing.unpack(flat), cfg=cfg, k=k, block_size=block_size)


def propose_chained_step(params, cache, features, state: ProposalRows, flat, packing: Packing, *, cfg, k: int,
                         block_size: int):  # fmt: skip
    """`guess` for a chained round, its rows resolved against the sampler state round N left (device_proposals):
    (the state's rows with every sequence's K guesses, cache)."""
    c: ChainedRows = packing.unpack(flat)
    b = c.rows.rows
    real = b.meta.seq_lens > 0
    r = resolve(b.positions, real, c.slot, state, k, offset=1)
    seq = jnp.minimum(jnp.arange(b.tokens.shape[0]) // (k + 1), c.slot.shape[0] - 1)
    feature_slots = c.target_tables[seq, r.positions // block_size] * block_size + r.positions % block_size
    meta = dataclasses.replace(b.meta, slot_mapping=jnp.where(r.valid, b.meta.slot_mapping, -1))
    rows = EagleBatch(dataclasses.replace(b, tokens=r.tokens, meta=meta, last=r.last), feature_slots)
    guesses, cache = guess(params, cache, features, rows, cfg=cfg, k=k, block_size=block_size, lens=r.lens)
    return with_guesses(state, c.slot, real, guesses), cache


def store_features(features, fc, aux, slots):
    """Write fc(aux) [T, H] at the target cache slots of a step's tokens (padding: slot -1, dropped)."""
    rows = jnp.where(slots >= 0, slots, features.shape[0])
    return features.at[rows].set(layers.linear(aux, fc).astype(features.dtype), mode="drop")


def aux_layers(head_dir: str, target_cfg) -> tuple[int, ...]:
    """The target layers whose inputs the engine's steps must return for this head."""
    return head_lib.read_config(head_dir, target_cfg).aux_layers


class Eagle3Proposer:
    def __init__(self, head_dir: str, k: int, ctx: DraftContext, target_embed):
        from rtpjax.runner.model_runner import buckets, step_buckets

        self.head = head_lib.read_config(head_dir, ctx.cfg)
        self.cfg = self.head.cfg
        params = head_lib.load_params(head_dir, self.head, target_embed, target_embed.dtype)
        place = (lambda x: x) if ctx.mesh is None else functools.partial(jax.device_put,
                                                                         device=NamedSharding(ctx.mesh, P()))  # fmt: skip
        self.params = jax.tree.map(place, params)
        self.k, self.ctx, self.block_size = k, ctx, ctx.block_size
        self.attention = ctx.attention(self.cfg.head_dim)
        self.max_blocks = -(-(ctx.max_model_len + k) // ctx.block_size)
        self.pool = BlockPool(ctx.max_seqs * self.max_blocks, enable_prefix_caching=False)
        cache_cfg = dataclasses.replace(self.cfg, dtype=jnp.dtype(target_embed.dtype).name)
        self.cache = kv.allocate(cache_cfg, self.pool.num_blocks, ctx.block_size, mesh=ctx.mesh)
        self.features = place(jnp.zeros((ctx.target_num_blocks * ctx.block_size, self.cfg.hidden_size),
                                        target_embed.dtype))  # fmt: skip
        self.states: dict[Sequence, _DraftState] = {}
        self.token_buckets = step_buckets(ctx.max_num_batched_tokens, 1)
        step = jax.jit(functools.partial(propose_step, cfg=self.cfg, k=k, block_size=ctx.block_size),
                       static_argnums=(4,), donate_argnums=(1,))  # fmt: skip
        self._compiled = {}  # token bucket -> executable
        for t in self.token_buckets:  # compiled (and run once) now: proposing never compiles
            flat, packing = pack(self._batch([], [], t))
            self._compiled[t] = step.lower(self.params, self.cache, self.features, flat, packing).compile()
            _, self.cache = self._compiled[t](self.params, self.cache, self.features, flat)
        chained_step = functools.partial(propose_chained_step, cfg=self.cfg, k=k, block_size=ctx.block_size)
        self.device = DeviceProposals(self, chained_step, 1, buckets(ctx.max_seqs, 1), lambda: (self.features,))
        self._store = jax.jit(store_features, donate_argnums=(0,))
        width = len(self.head.aux_layers) * self.head.target_hidden_size
        for t in ctx.target_token_buckets:  # one per shape of the target's steps (slots: a step's output), traced now
            aux = place(jnp.zeros((t, width), target_embed.dtype))
            self.features = self._store(self.features, self.params["fc"], aux, place(jnp.full(t, -1, jnp.int32)))

    def observe(self, aux, slots) -> None:
        """A target step was queued: its tokens' features go into the store at their cache slots (on the device,
        nothing waits)."""
        self.features = self._store(self.features, self.params["fc"], aux, slots)

    def _batch(self, chunks: list[tuple[_DraftState, SeqChunk]], slots: list[np.ndarray], num_tokens: int,
               num_seqs: int | None = None) -> EagleBatch:  # fmt: skip
        num_seqs = num_seqs or min(num_tokens, self.ctx.max_seqs)
        step = build_step([c for _, c in chunks], self.block_size, num_tokens=num_tokens, num_seqs=num_seqs,
                          max_blocks=self.max_blocks, **self.attention)  # fmt: skip
        writable = np.zeros(num_seqs, np.int32)
        writable[: len(chunks)] = [len(state.blocks) * self.block_size for state, _ in chunks]
        feature_slots = np.zeros(num_tokens, np.int32)
        if slots:
            flat = np.concatenate(slots)
            feature_slots[: len(flat)] = flat
        return EagleBatch(DraftBatch(step.tokens, step.positions, step.meta, step.logits_indices, writable),
                          feature_slots)  # fmt: skip

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        self.release_finished()
        proposing = set(seqs)
        # Rows run from the first the head lacks (at least the last one: its output guesses) to the second-to-last
        # token's position.
        queue = []
        for seq in seqs:
            state = self._state(seq, proposing, len(seq.token_ids) + self.k - 1)
            queue.append([seq, state, min(state.computed, len(seq.token_ids) - 2), len(seq.token_ids) - 1])
        proposals: dict[Sequence, list[int]] = {}
        for guesses, owners in self._catch_up(queue):
            guesses = np.asarray(guesses)
            for row, seq, state in owners:
                state.computed = len(seq.token_ids) - 1
                proposals[seq] = guesses[row].tolist()
        return [proposals[seq][:k] for seq, k in zip(seqs, ks)]

    def _catch_up(self, queue: list[list]):
        """Launch the head over rows start .. end - 1 of each [seq, state, start, end] (`calls_within_budget`);
        yields (guesses, [(row, seq, state)]) per call for the sequences whose rows it finished."""
        for pieces, owners, used in calls_within_budget(queue, self.token_buckets[-1], self.ctx.max_seqs):
            chunks, slots = [], []
            for seq, state, start, n in pieces:
                ids, table = seq.token_ids, np.asarray(seq.block_table)
                pos = np.arange(start, start + n)
                chunks.append((state, SeqChunk(ids[start + 1 : start + 1 + n], start, state.blocks)))
                slots.append((table[pos // self.block_size] * self.block_size + pos % self.block_size).astype(np.int32))
            t = next(b for b in self.token_buckets if b >= used)
            guesses, self.cache = self._compiled[t](self.params, self.cache, self.features,
                                                    pack(self._batch(chunks, slots, t))[0])  # fmt: skip
            yield guesses, owners

    def chained_rows(self, chunks: list[tuple[_DraftState, SeqChunk, Sequence]], num_seqs: int,
                     sink: int) -> ChainedRows:  # fmt: skip
        rows = self._batch([(head, chunk) for head, chunk, _ in chunks], [], num_seqs * (self.k + 1), num_seqs)
        slot = np.full(num_seqs, sink, np.int32)
        tables = np.zeros((num_seqs, self.ctx.target_max_blocks), np.int32)
        for i, (_, _, seq) in enumerate(chunks):
            slot[i] = seq.slot
            tables[i, : len(seq.block_table)] = seq.block_table
        return ChainedRows(rows, slot, tables)

    def _state(self, seq: Sequence, proposing: set, num_tokens: int) -> _DraftState:
        """The sequence's head state with blocks for num_tokens; rows a chained round's device guesses caught up on
        count as computed once the round ahead of it was read (its item then starts at that round's last token)."""
        state = self.states.get(seq)
        if state is None:
            state = self.states[seq] = _DraftState([])
        state.computed = self.device.settle(seq, state.computed)
        reserve(self, state, num_tokens, proposing)
        return state

    # Blocks of finished or preempted sequences go back the way the draft model's do; chained rounds go through
    # `self.device` the same way too.
    release_finished, _drop = DraftModelProposer.release_finished, DraftModelProposer._drop
    propose_on_device, warm = DraftModelProposer.propose_on_device, DraftModelProposer.warm
