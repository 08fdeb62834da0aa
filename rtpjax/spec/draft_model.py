"""Draft-model proposals: a smaller model of the same vocabulary guesses the next K tokens greedily.

The draft has its own paged KV cache and block tables (its own BlockPool). Per sequence it remembers how many of the
sequence's tokens its cache holds; a proposal first runs the tokens it has not seen (the prompt the first time, then
the tokens the target accepted since) as one ragged chunk per sequence, takes the argmax at each sequence's last token,
and then feeds its own guesses back K-1 times, all inside one jitted program per token bucket (compiled at
construction, like the runner's steps, so proposing never compiles). Guesses the target rejected are not undone:
their K/V lie past what the draft counts as computed and are overwritten by the next catch-up.

Proposals are argmaxes, a point mass per draft, so `runner.verify` keeps the target's distribution exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.engine.sequence import Sequence, Status
from rtpjax.kernels.metadata import AttentionMetadata
from rtpjax.kv import kv_cache as kv
from rtpjax.kv.block_pool import BlockPool
from rtpjax.runner.step_inputs import Packing, SeqChunk, build_step, pack
from rtpjax.spec.device_proposals import DeviceProposals, ProposalRows, resolve, with_guesses


@dataclasses.dataclass(frozen=True)
class DraftContext:
    """What a model-based proposer takes from the target engine: sizes and placement of its steps."""

    cfg: object  # the target's ModelConfig
    model_dir: str  # the target's folder (its tokenizer is compared with the draft's)
    dtype: str | None
    block_size: int
    max_model_len: int
    max_num_batched_tokens: int
    max_seqs: int  # sequences one proposal covers at most (the verify step's limit)
    mesh: object = None
    attention_impl: str = "auto"  # resolved for the draft's own head_dim
    kv_write: str = "auto"
    load_format: str = "auto"  # "dummy" (benchmarks): the draft's random weights are made on the devices too
    # An EAGLE-3 head keeps one feature per slot of the target's cache, written after each of its steps:
    target_num_blocks: int = 0
    target_token_buckets: tuple[int, ...] = ()  # the token buckets of the target's steps (the features' shapes)
    quantized_decode: str = "auto"  # a pre-quantized draft's decode matmuls, as the target's (--quantized-decode)
    target_max_blocks: int = 0  # the width of the target's block tables (an EAGLE-3 head's chained proposals)

    def attention(self, head_dim: int) -> dict:
        """The static attention configuration of the draft's steps (as the runner's, for the draft's shape)."""
        from rtpjax.kernels.attention import resolve_impl
        from rtpjax.parallel.sharding import tensor_ways

        impl = resolve_impl(self.attention_impl, head_dim)
        mesh = self.mesh if impl == "pallas" and tensor_ways(self.mesh) > 1 else None
        return dict(impl=impl, mesh=mesh, kv_write=self.kv_write)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftBatch:
    tokens: jax.Array  # [T] the tokens each sequence's draft cache lacks, ragged
    positions: jax.Array  # [T]
    meta: AttentionMetadata
    last: jax.Array  # [S] each sequence's last token in `tokens`
    writable: jax.Array  # [S] positions below this have a draft block (guesses past it are not written)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChainedDraft:
    """A chained round's catch-up, laid out by the host before the round ahead is read: K + 1 positions per sequence
    from the first token the draft cache lacks; tokens, which are real and the last one come from the sampler state
    on the device (device_proposals)."""

    rows: DraftBatch
    slot: jax.Array  # [S] each sequence's sampler slot (padding: the sink)


def guess(params, cache, b: DraftBatch, *, cfg, forward, k: int, block_size: int, lens=None):
    """Catch up on the new tokens, then K greedy guesses per sequence from each one's `last` token: ([S, K] int32,
    cache). lens: the sequences' lengths, where the guesses go on from (default: the batch's context lengths)."""
    logits, cache = forward(params, cfg, b.tokens, b.positions, cache, b.meta, b.last)[:2]
    if lens is not None:
        b = dataclasses.replace(b, meta=dataclasses.replace(b.meta, seq_lens=lens))
    guess = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    guesses = [guess]
    for j in range(k - 1):  # guess j sits at position len + j; its K/V is written, the next guess read off it
        pos, meta = chained(b, j, block_size)
        logits, cache = forward(params, cfg, guess, pos, cache, meta, None)[:2]
        guess = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        guesses.append(guess)
    return jnp.stack(guesses, axis=1), cache


def propose_step(params, cache, flat, packing: Packing, *, cfg, forward, k: int, block_size: int):
    """`guess` over a DraftBatch laid out on the host."""
    return guess(params, cache, packing.unpack(flat), cfg=cfg, forward=forward, k=k, block_size=block_size)


def propose_chained_step(params, cache, state: ProposalRows, flat, packing: Packing, *, cfg, forward, k: int,
                         block_size: int):  # fmt: skip
    """`guess` for a chained round over rows resolved against the sampler state round N left: (the state's rows with
    every sequence's K guesses, cache)."""
    c: ChainedDraft = packing.unpack(flat)
    b = c.rows
    real = b.meta.seq_lens > 0
    r = resolve(b.positions, real, c.slot, state, k, offset=0)
    meta = dataclasses.replace(b.meta, slot_mapping=jnp.where(r.valid, b.meta.slot_mapping, -1))
    guesses, cache = guess(params, cache, dataclasses.replace(b, tokens=r.tokens, meta=meta, last=r.last), cfg=cfg,
                           forward=forward, k=k, block_size=block_size, lens=r.lens)  # fmt: skip
    return with_guesses(state, c.slot, real, guesses), cache


def chained(b: DraftBatch, j: int, block_size: int) -> tuple[jax.Array, AttentionMetadata]:
    """Positions [S] and attention metadata of chained guess j: one token per sequence at len + j, its K/V written
    where the sequence has a draft block."""
    lens = b.meta.seq_lens
    real = lens > 0
    num_seqs = lens.shape[0]
    starts = jnp.minimum(jnp.arange(num_seqs + 1, dtype=jnp.int32), jnp.sum(real, dtype=jnp.int32))
    pos = jnp.where(real, lens + j, 0)
    write = real & (pos < b.writable)
    block = b.meta.block_tables[jnp.arange(num_seqs), jnp.minimum(pos // block_size, b.meta.block_tables.shape[1] - 1)]
    slots = jnp.where(write, block * block_size + pos % block_size, -1)
    return pos, dataclasses.replace(b.meta, query_start_loc=starts, seq_lens=jnp.where(real, pos + 1, 0),
                                    slot_mapping=slots, plan={})  # fmt: skip


@dataclasses.dataclass
class _DraftState:
    """A sequence's place in the draft cache."""

    blocks: list[int]
    computed: int = 0  # leading tokens whose K/V the draft cache holds
    base: int = 0  # its token count when last proposed for
    written: list[int] = dataclasses.field(default_factory=list)  # guesses whose K/V went in at base, base + 1, ...


def check_vocabulary(draft_dir: str, draft_cfg, ctx: DraftContext) -> None:
    """The draft must speak the target's token ids: same vocabulary size and, where both ship a tokenizer.json, the
    same token -> id map."""
    if draft_cfg.vocab_size != ctx.cfg.vocab_size:
        raise ValueError(f"speculative_config: the draft model {draft_dir} has a vocabulary of {draft_cfg.vocab_size} "
                         f"tokens, the target {ctx.cfg.vocab_size}; a draft must share the target's vocabulary")
    files = [Path(d) / "tokenizer.json" for d in (draft_dir, ctx.model_dir)]
    if all(f.is_file() for f in files):
        vocabs = [json.loads(f.read_text()).get("model", {}).get("vocab") for f in files]
        if vocabs[0] != vocabs[1]:
            raise ValueError(f"speculative_config: the draft model {draft_dir} has another tokenizer than the target "
                             "(tokenizer.json vocabularies differ); a draft must share the target's token ids")


class DraftModelProposer:
    def __init__(self, draft_dir: str, k: int, ctx: DraftContext):
        from rtpjax.loading.model_source import load_model
        from rtpjax.models import load_config
        from rtpjax.runner.model_runner import buckets, step_buckets

        check_vocabulary(draft_dir, load_config(draft_dir)[0], ctx)
        self.cfg, family, self.params = load_model(draft_dir, dtype=ctx.dtype, mesh=ctx.mesh,
                                                   load_format=ctx.load_format,
                                                   quantized_decode=ctx.quantized_decode)  # fmt: skip
        self.k, self.ctx, self.block_size = k, ctx, ctx.block_size
        self.attention = ctx.attention(self.cfg.head_dim)
        self.max_blocks = -(-(ctx.max_model_len + k) // ctx.block_size)
        self.pool = BlockPool(ctx.max_seqs * self.max_blocks, enable_prefix_caching=False)
        self.cache = kv.allocate(self.cfg, self.pool.num_blocks, ctx.block_size, mesh=ctx.mesh)
        self.states: dict[Sequence, _DraftState] = {}
        self.token_buckets = step_buckets(ctx.max_num_batched_tokens, 1)
        chained_step = functools.partial(propose_chained_step, cfg=self.cfg, forward=family.forward, k=k,
                                         block_size=ctx.block_size)  # fmt: skip
        self.device = DeviceProposals(self, chained_step, 0, buckets(ctx.max_seqs, 1))  # chained rounds' proposals
        self._step = jax.jit(functools.partial(propose_step, cfg=self.cfg, forward=family.forward, k=k,
                                               block_size=ctx.block_size), static_argnums=(3,), donate_argnums=(1,))
        self._compiled = {}  # token bucket -> executable
        for t in self.token_buckets:  # compiled (and run once) now: proposing never compiles
            flat, packing = pack(self._batch([], t))
            self._compiled[t] = self._step.lower(self.params, self.cache, flat, packing).compile()
            _, self.cache = self._compiled[t](self.params, self.cache, flat)

    def _seqs_for(self, num_tokens: int) -> int:
        return min(num_tokens, self.ctx.max_seqs)

    def _batch(self, chunks: list[tuple[_DraftState, SeqChunk]], num_tokens: int,
               num_seqs: int | None = None) -> DraftBatch:  # fmt: skip
        num_seqs = num_seqs or self._seqs_for(num_tokens)
        step = build_step([c for _, c in chunks], self.block_size, num_tokens=num_tokens, num_seqs=num_seqs,
                          max_blocks=self.max_blocks, **self.attention)  # fmt: skip
        writable = np.zeros(num_seqs, np.int32)
        writable[: len(chunks)] = [len(state.blocks) * self.block_size for state, _ in chunks]
        return DraftBatch(step.tokens, step.positions, step.meta, step.logits_indices, writable)

    # -- proposing --------------------------------------------------------------------------------------------------

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        self.release_finished()
        proposing = set(seqs)
        queue = []  # each sequence's tokens from the first the draft cache lacks
        for seq in seqs:
            state = self._state(seq, proposing, len(seq.token_ids) + self.k - 1)
            queue.append([seq, state, state.computed, len(seq.token_ids)])
        proposals: dict[Sequence, list[int]] = {}
        for guesses, owners in self._catch_up(queue):
            guesses = np.asarray(guesses)
            for row, seq, state in owners:
                state.base, state.computed = len(seq.token_ids), len(seq.token_ids)
                state.written = guesses[row, : self.k - 1].tolist()
                proposals[seq] = guesses[row].tolist()
        return [proposals[seq][:k] for seq, k in zip(seqs, ks)]

    def _catch_up(self, queue: list[list]):
        """Launch the draft over tokens start .. end - 1 of each [seq, state, start, end] (`calls_within_budget`);
        yields (guesses, [(row, seq, state)]) per call for the sequences whose tokens it finished."""
        for pieces, owners, used in calls_within_budget(queue, self.token_buckets[-1], self.ctx.max_seqs):
            chunks = [(state, SeqChunk(seq.token_ids[start : start + n], start, state.blocks))
                      for seq, state, start, n in pieces]  # fmt: skip
            t = next(b for b in self.token_buckets if b >= used)
            guesses, self.cache = self._compiled[t](self.params, self.cache, pack(self._batch(chunks, t))[0])
            yield guesses, owners

    def propose_on_device(self, state, items):
        """A chained round's guesses, queued on the device (device_proposals)."""
        return self.device.propose(state, items)

    def warm(self, state):
        """The chained rounds' programs, compiled and run once against the engine's sampler state; returns it."""
        return self.device.warm(state)

    def chained_rows(self, chunks: list[tuple[_DraftState, SeqChunk, Sequence]], num_seqs: int,
                     sink: int) -> ChainedDraft:  # fmt: skip
        rows = self._batch([(draft, chunk) for draft, chunk, _ in chunks], num_seqs * (self.k + 1), num_seqs)
        slot = np.full(num_seqs, sink, np.int32)
        slot[: len(chunks)] = [seq.slot for _, _, seq in chunks]
        return ChainedDraft(rows, slot)

    def _state(self, seq: Sequence, proposing: set, num_tokens: int) -> _DraftState:
        """The sequence's draft state, its cache progress moved to what its tokens confirm (or a chained round's
        device proposal caught up on), with blocks for num_tokens (taken from sequences not proposed for now if the
        pool runs short)."""
        state = self.states.get(seq)
        if state is None:
            state = self.states[seq] = _DraftState([])
        else:  # the guesses whose K/V went in and that the sequence's tokens now confirm count as computed
            ids, confirmed = seq.token_ids, 0
            while confirmed < len(state.written) and state.base + confirmed < len(ids) and \
                    ids[state.base + confirmed] == state.written[confirmed]:  # fmt: skip
                confirmed += 1
            # the last token runs: its logits guess
            state.computed = min(self.device.settle(seq, state.base + confirmed), len(ids) - 1)
        reserve(self, state, num_tokens, proposing)
        return state

    def release_finished(self) -> None:
        """Give back the blocks of sequences that finished or were preempted (a preempted one starts again)."""
        for seq in [s for s in self.states if s.status is not Status.RUNNING]:
            self._drop(seq)

    def _drop(self, seq: Sequence) -> None:
        self.device.drop(seq)
        self.pool.release(self.states.pop(seq).blocks)


def calls_within_budget(queue: list[list], limit: int, max_seqs: int):
    """Splits a catch-up over calls of at most `limit` tokens and `max_seqs` sequences: usually one call; a long one
    (a fresh prompt) goes over several. `queue` holds [seq, state, start, end] and is consumed. Yields, per call,
    (pieces [(seq, state, start, n)], owners [(row, seq, state)] of the sequences it finishes, tokens used); a piece
    cut short leaves its rest first in the queue, and that call's guesses for it go unused."""
    while queue:
        pieces, owners, budget = [], [], limit
        while queue and budget > 0 and len(pieces) < max_seqs:
            seq, state, start, end = queue[0]
            n = min(end - start, budget)
            pieces.append((seq, state, start, n))
            budget -= n
            if start + n < end:
                queue[0][2] = start + n
                break
            owners.append((len(pieces) - 1, seq, state))
            queue.pop(0)
        yield pieces, owners, limit - budget


def reserve(proposer, state: _DraftState, num_tokens: int, proposing: set) -> None:
    """Blocks for `num_tokens` in the proposer's pool (up to its max_blocks), taken from sequences not proposed for
    now if the pool runs short."""
    need = min(-(-num_tokens // proposer.block_size), proposer.max_blocks) - len(state.blocks)
    if need > 0:
        blocks = proposer.pool.allocate(need)
        while blocks is None:
            proposer._drop(next(s for s in proposer.states if s not in proposing))
            blocks = proposer.pool.allocate(need)
        state.blocks += blocks
