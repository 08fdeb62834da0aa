"""A request's state in a form that can leave its engine: what prefill/decode hand-off, swapping and migration move.

A RequestSnapshot holds everything host-side (tokens read so far, logprobs, how far each completion's K/V reaches, the
chained block hashes of its full blocks, how much output was already reported, the detokenizer's offsets); the K/V
itself travels beside it as `KVBlocks`. Both are msgspec types of plain values, so they cross processes and hosts.

A token still on the device (PENDING) is not part of a snapshot. The receiver runs the last known token again (its K/V
travels but counts as not computed) and samples the next token anew: sampling is keyed by (seed, completion, output
position) and every request has a seed, so it draws the same token. Sampler rows (penalty histories) are rebuilt from
the tokens on admission, as for any admitted sequence.
"""

from __future__ import annotations

import msgspec

from rtpjax.engine import detokenizer
from rtpjax.engine.request import ModelInfo, Request
from rtpjax.engine.sequence import PENDING, HostKV, Sequence, Status
from rtpjax.kv.block_pool import prefix_hashes
from rtpjax.kv.host_blocks import KVBlocks, KVLayout
from rtpjax.sampling_params import SamplingParams

__all__ = ["CompletionSnapshot", "KVBlocks", "KVLayout", "RequestSnapshot", "capture", "restore"]


class CompletionSnapshot(msgspec.Struct):
    """One of a request's n completions."""

    index: int
    token_ids: list[int]  # prompt + output tokens read so far (never PENDING)
    logprobs: list[dict[int, float]]  # per output token, when the request asks for logprobs
    num_computed: int  # leading positions whose K/V travel in the request's KVBlocks
    kv_rows: list[int]  # its blocks covering those positions, in order, as rows of the KVBlocks (siblings share rows)
    block_hashes: list[bytes]  # chained hashes (block_pool.prefix_hashes) of its full computed blocks
    num_sent: int  # output tokens already reported to the caller
    text: str  # detokenized output so far (cut at a matched stop string)
    text_sent: int  # characters of it already reported
    prefix_offset: int  # the detokenizer's window over prompt + output tokens (detokenizer.DetokState)
    read_offset: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestSnapshot(msgspec.Struct):
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's sampling seed (drawn by its first engine when params.seed is None)
    max_tokens: int
    priority: int
    stop_ids: list[int]  # EOS (unless ignore_eos) and stop_token_ids, as its first engine resolved them
    extra_key: bytes  # enters the block hashes (adapters, images)
    completions: list[CompletionSnapshot]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    reported: bool = False  # whether an output (with the prompt logprobs) already went out


def _known(seq: Sequence) -> list[int]:
    ids = seq.token_ids
    return ids[: ids.index(PENDING)] if PENDING in ids else list(ids)


def capture(request: Request, block_size: int) -> tuple[RequestSnapshot, list[int]]:
    """The request's snapshot and the cache blocks whose contents go with it (row r of its KVBlocks = block r)."""
    rows: dict[int, int] = {}  # cache block -> row; completions share their prompt blocks
    completions = []
    for seq, sent in zip(request.seqs, request.sent):
        known = _known(seq)
        computed = max(0, min(seq.num_computed, len(known) - 1))  # the last known token runs again on arrival
        full = computed // block_size
        completions.append(CompletionSnapshot(
            index=seq.index, token_ids=known, logprobs=list(seq.logprobs[: len(known) - seq.num_prompt]),
            num_computed=computed,
            kv_rows=[rows.setdefault(b, len(rows)) for b in seq.block_table[: -(-computed // block_size)]],
            block_hashes=prefix_hashes(known[: full * block_size], block_size, seq.extra_key),
            num_sent=sent, text=seq.detok.text, text_sent=seq.detok.streamed, prefix_offset=seq.detok.prefix_offset,
            read_offset=seq.detok.read_offset, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        ))  # fmt: skip
    first = request.seqs[0]
    snap = RequestSnapshot(
        request_id=request.request_id, prompt=request.prompt, prompt_ids=list(request.prompt_ids),
        params=request.params, seed=first.seed, max_tokens=first.max_tokens, priority=first.priority,
        stop_ids=list(first.stop_ids), extra_key=first.extra_key, completions=completions,
        prompt_logprobs=request.prompt_logprobs, reported=request.reported,
    )  # fmt: skip
    return snap, list(rows)


def restore(snap: RequestSnapshot, kv: KVBlocks, block_size: int, info: ModelInfo) -> Request:
    """A Request whose sequences wait to be admitted with their K/V loaded from `kv`. Raises ValueError, naming the
    problem, for a snapshot this engine cannot continue."""
    _check(snap, kv, block_size, info)
    seqs = []
    for c in snap.completions:
        seq = Sequence(snap.request_id, c.index, list(snap.prompt_ids), snap.params, seed=snap.seed,
                       max_tokens=snap.max_tokens, priority=snap.priority, extra_key=snap.extra_key,
                       stop_ids=tuple(snap.stop_ids), token_ids=list(c.token_ids), logprobs=list(c.logprobs))  # fmt: skip
        seq.detok = detokenizer.DetokState(c.prefix_offset, c.read_offset, c.text, c.text_sent)
        if c.finish_reason is not None:
            seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, c.finish_reason, c.stop_reason
        elif c.kv_rows:
            seq.host_kv = HostKV(kv, list(c.kv_rows), c.num_computed)
        seqs.append(seq)
    for seq in seqs[1:]:  # a sibling with no K/V of its own shares the first one's prompt blocks, as at arrival
        if seq.host_kv is None and not seq.finished:
            seq.fork_parent = seqs[0]
    return Request(snap.request_id, snap.prompt, list(snap.prompt_ids), snap.params, seqs,
                   sent=[c.num_sent for c in snap.completions], reported=snap.reported,
                   prompt_logprobs=snap.prompt_logprobs)  # fmt: skip


def _check(snap: RequestSnapshot, kv: KVBlocks, block_size: int, info: ModelInfo) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"request {snap.request_id!r}: {message}")

    need(any(c.finish_reason is None for c in snap.completions), "the snapshot has no unfinished completion")
    need(len(snap.prompt_ids) + snap.max_tokens <= info.max_model_len,
         f"prompt ({len(snap.prompt_ids)} tokens) + max_tokens ({snap.max_tokens}) exceeds this engine's context "
         f"({info.max_model_len})")  # fmt: skip
    for c in snap.completions:
        ids = c.token_ids
        need(ids[: len(snap.prompt_ids)] == snap.prompt_ids, f"completion {c.index}'s tokens do not start with the prompt")
        need(all(0 <= t < info.vocab_size for t in ids), f"completion {c.index} has a token outside the vocabulary")
        need(0 <= c.num_computed < len(ids),
             f"completion {c.index} claims {c.num_computed} computed of {len(ids)} tokens; at least one must run")
        need(len(c.kv_rows) == -(-c.num_computed // block_size) and all(0 <= r < kv.num_blocks for r in c.kv_rows),
             f"completion {c.index}'s {len(c.kv_rows)} blocks do not hold its {c.num_computed} computed tokens in "
             f"{kv.num_blocks} blocks of {block_size}")  # fmt: skip
        full = c.num_computed // block_size
        need(c.block_hashes == prefix_hashes(ids[: full * block_size], block_size, snap.extra_key),
             f"completion {c.index}'s block hashes do not match its tokens")
