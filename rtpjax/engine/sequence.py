"""A sequence's life in the engine: its tokens, what of them is in the KV cache, its blocks, and its timings.

A request with n > 1 completions is n sequences that share a prompt (and its KV blocks).
"""

from __future__ import annotations

import dataclasses
import enum
import time

from rtpjax.distributed.messages import RequestTimings
from rtpjax.kv.host_blocks import KVBlocks, PackedBlocks
from rtpjax.sampling_params import SamplingParams

PENDING = -1  # a token sampled on the device whose id the host has not read yet


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class RequestMetrics:
    """Timestamps (time.monotonic()) the server turns into TTFT, ITL, queue time and E2E latency."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    inter_token_latencies: list[float] = dataclasses.field(default_factory=list)

    def on_token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        else:
            self.inter_token_latencies.append(now - self.last_token)
        self.last_token = now

    def timings(self) -> RequestTimings:
        """As offsets from arrival, for the wire (a monotonic clock means nothing in another process's hands)."""
        times = (self.first_scheduled, self.first_token, self.last_token, self.finished)
        offsets = (None if t is None else t - self.arrival for t in times)
        return RequestTimings(*offsets, list(self.inter_token_latencies))

    @classmethod
    def from_timings(cls, arrival: float, timings: RequestTimings) -> "RequestMetrics":
        """The request's metrics on this process's clock, which saw it arrive at `arrival`."""
        offsets = (timings.first_scheduled, timings.first_token, timings.last_token, timings.finished)
        times = (None if t is None else arrival + t for t in offsets)
        return cls(arrival, *times, list(timings.inter_token_latencies))


@dataclasses.dataclass
class HostKV:
    """A sequence's leading blocks, waiting on the host to be written into the cache when it is admitted (its KV came
    from another engine). `kv` may be shared by the request's completions; `rows` are this sequence's blocks in it."""

    kv: KVBlocks | PackedBlocks  # packed rows on the device: a prefill hand-off's
    rows: list[int]
    num_computed: int  # leading positions whose K/V those blocks hold


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int
    priority: int = 0
    arrival_order: int = 0
    extra_key: bytes = b""  # enters the prefix hashes (adapters, images)
    stop_ids: tuple[int, ...] = ()  # EOS (unless ignore_eos) and stop_token_ids
    status: Status = Status.WAITING
    token_ids: list[int] = dataclasses.field(default_factory=list)  # prompt + generated (PENDING until read)
    num_computed: int = 0  # tokens whose K/V are (or are being) written to the cache
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_registered_blocks: int = 0  # leading full blocks published to the prefix cache
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)  # the chain over leading full blocks
    slot: int = -1  # row of the device-side sampler state while running
    fork_parent: "Sequence | None" = None  # n > 1: wait for this sibling's prompt blocks, then share them
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    output_text: str = ""
    metrics: RequestMetrics = dataclasses.field(default_factory=lambda: RequestMetrics(time.monotonic()))
    detok: object = None  # the incremental detokenizer's state
    host_kv: HostKV | None = None  # K/V to load at admission instead of computing (an adopted request)
    tier_fetch: object = None  # kv.tiers Fetch: its prefix blocks coming up from a KV tier while it waits
    tier_pin: list[int] = dataclasses.field(default_factory=list)  # device prefix blocks it holds while that loads
    preempted: bool = False
    passed_over: int = 0  # admission rounds in which a later arrival was admitted while it waited (lpm's bound)
    draft_acceptance: float = 1.0  # recent fraction of this sequence's drafts accepted (speculation's policy)
    drafts_found: bool = True  # its latest chained round's lookup found drafts (spec/chained.py)
    hand_off: bool = False  # a prefill hand-off's: leaves the engine with its first token, so no step goes past it

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def wants_more(self) -> bool:
        """Whether another token may be scheduled (the host may not have read the last one yet)."""
        return self.num_generated < (1 if self.hand_off else self.max_tokens)
