"""The engine's wire protocol: every message that crosses a process boundary, as named types, in msgpack.

One tagged union (`Message`, tag field "type") covers startup, requests in, aborts, a stop and per-step outputs out,
so the engine process, and later a router, prefill/decode roles and multi-host followers, speak one language. Fields
are plain (ints, floats, strings, lists, dicts with int keys): nothing in a message means something only in the
process that made it. Times are wall-clock seconds (`time.time()`) or offsets from a request's arrival, never
`time.monotonic()` values, which mean nothing on another host.

`decode` checks every field's type (and runs SamplingParams' validation); what it rejects raises ProtocolError with
msgspec's account of the first wrong field (e.g. "Expected `int`, got `str` - at `$.prompt_ids[0]`").
"""

from __future__ import annotations

import time
from typing import Any, Literal, Union

import msgspec

from rtpjax.kv.host_blocks import KVLayout
from rtpjax.sampling_params import SamplingParams


class ProtocolError(Exception):
    """Bytes that are not a message of the expected types. `kind` (its "type") and `request_id`: what the message
    names, where its raw form still shows it, so the sender can be told which request failed."""

    def __init__(self, message: str, kind: str | None = None, request_id: str | None = None):
        super().__init__(message)
        self.kind, self.request_id = kind, request_id


class _Message(msgspec.Struct, tag_field="type", gc=False):
    """A top-level message: a map carrying its kind under "type" (named fields, so a reader skips what it does not
    know and a person can read a dump)."""


# -- startup ---------------------------------------------------------------------------------------------------------


class ModelInfo(msgspec.Struct, frozen=True):
    """What validating a request needs to know of the engine (sent once, in Ready)."""

    vocab_size: int
    max_model_len: int
    eos_ids: tuple[int, ...]
    max_num_seqs: int


class TierStats(msgspec.Struct, gc=False):
    """One KV tier below the device (kv/tiers): its capacity and what moved through it since the engine started."""

    tier: str  # "host" or "disk"
    capacity_bytes: int
    used_bytes: int
    queries: int  # prompt tokens looked up in this tier (those the device did not hold)
    hits: int  # of which loaded from it
    bytes_written: int  # blocks written down into it
    bytes_read: int  # blocks read out of it (host: onloaded to the device; disk: read into the host tier)
    write_seconds: float
    read_seconds: float  # disk reads (host onloads overlap the steps and are not timed apart)
    errors: int = 0  # corrupt, truncated or missing files; failed writes
    dropped: int = 0  # blocks not written down (the tier full of leased rows, a failed write)


class EngineStats(msgspec.Struct, gc=False):
    """The engine's gauges as of its last step (LLMEngine.stats(); AsyncLLM.stats() gives them as a dict)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_free_blocks: int
    num_blocks: int
    kv_tiers: list[TierStats] = []  # empty without KV tiers
    num_loading: int = 0  # waiting sequences whose prefix blocks are being read from a KV tier
    num_preemptions: int = 0  # running sequences preempted for blocks since start (recomputed, or swapped to a tier)
    expert_load: list[list[int]] = []  # MoE: tokens per logical expert per MoE layer since start (EPLB's input)
    # What a router's cost model reads (rtpjax.router): the work queued ahead of a new request, and the loop's
    # cumulative counters, whose differences between two reads give measured step times against tokens per step.
    waiting_prompt_tokens: int = 0  # prompt tokens of waiting sequences not yet computed
    running_tokens: int = 0  # tokens held by running sequences
    max_num_batched_tokens: int = 0
    block_size: int = 0
    total_steps: int = 0
    total_tokens: int = 0  # tokens run through the model (prompt chunks and decode inputs)
    total_busy_s: float = 0.0
    # Speculative decoding since the engine started (vLLM's spec_decode_* counters; zeros without speculation).
    spec_decode_num_drafts: int = 0  # sequence-steps that verified at least one draft
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = msgspec.field(default_factory=list)
    kv_transfers_held: int = 0  # prefill role: hand-offs whose K/V waits (host or device) for its decode engine
    kv_transfers_pulled: int = 0  # decode role: hand-offs whose K/V arrived and was adopted
    kv_transfers_failed: int = 0  # decode role: pulls that failed (the prompt was computed here instead)
    # mean ms per hand-off by phase: prefill_d2h (waiting for the device's copy), prefill_stage (into shared memory,
    # checksummed), decode_channel (offer, bytes in, checksums), decode_h2d (onto the device), decode_d2d_offer and
    # decode_d2d_copy (device to device instead: until the offer; copies and checksums), decode_relayout
    kv_transfer_ms: dict[str, float] = msgspec.field(default_factory=dict)


class Startup(_Message, tag="startup"):
    """The first message to an engine: what to load and how to log."""

    model: str
    engine_args: dict[str, Any]  # EngineArgs' fields by name, plain values (the engine's EngineArgs checks them)
    log_level: int


class Ready(_Message, tag="ready"):
    info: ModelInfo
    stats: EngineStats


class Failed(_Message, tag="failed"):
    """The engine could not start. user_error: bad options or files (a ValueError or OSError there), which the parent
    raises as one line, the message alone."""

    message: str
    traceback: str
    user_error: bool = False


# -- KV cache events --------------------------------------------------------------------------------------------------
# vLLM's KV events (its --kv-events-config): blocks of the prefix cache stored under a hash, removed, or all cleared.
# The same names, fields and order, encoded as arrays, so consumers written for vLLM's stream read rtpjax's. Hashes
# are the engine's chained block hashes (kv.block_pool.block_hash, 16 bytes): a router recomputes them from a
# prompt's tokens with `prefix_hashes` and the engine's block size.

MEDIUM_GPU = "GPU"


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """One change to the prefix cache."""


class BlockStored(KVCacheEvent):
    """Consecutive full blocks of one sequence, each chained to the one before (the first to `parent_block_hash`)."""

    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]  # the blocks' tokens, block_size per block
    block_size: int
    lora_id: int | None  # the rest without defaults: always on the wire, as vLLM sends them
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    """Forget every block of this engine (sent first by an engine that starts)."""


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The events of one engine step (vLLM's batch: wall-clock time, events, data-parallel rank)."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class KVEventsPage(msgspec.Struct, gc=False):
    """GET /kv_events?since=SEQ: the numbered batches from SEQ on. `instance` names one start of the engine (numbers
    begin again at 0 with a new one); batches before `oldest` are gone from the buffer, so a reader whose SEQ is older
    has missed events and must forget what it knew of this engine."""

    instance: str
    oldest: int
    next: int  # the number the next batch will get
    batches: list[tuple[int, KVEventBatch]]


# -- prefill/decode hand-off -----------------------------------------------------------------------------------------


class KVTransferParams(msgspec.Struct, omit_defaults=True, gc=False):
    """vLLM's `kv_transfer_params` (NixlConnector's field names, so vllm-router passes them through): the prefill
    worker's request carries do_remote_decode; its response carries what the decode worker's request needs to pull
    the K/V (do_remote_prefill and the remote_* fields). rtpjax adds remote_request_id (the transfer's key on the
    prefill side), remote_host_id (equal to the puller's: the same host, so shared memory) and remote_device_ipc (the
    prefill's K/V can go device to device to a process of the same host: disagg/device_ipc)."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    remote_block_ids: list[int] | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_host_id: str | None = None
    remote_device_ipc: bool = False
    tp_size: int | None = None
    first_token_ids: list[int] | None = None  # the prefill's first token per completion: the decode side goes on from
    # it (its K/V covers the whole prompt), so what a client was shown first is what the rest follows


# -- requests in -----------------------------------------------------------------------------------------------------


class AddRequest(_Message, tag="add"):
    """A tokenized, validated request (RequestMaker.message); the engine builds its Request from this alone."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # decoding runs SamplingParams.validate
    seed: int  # resolved: the request's own seed or one drawn by the sender, so a replay samples the same
    arrival_time: float  # wall clock (time.time()) when the request arrived at the front end
    prompt: str | None = None  # the text the ids came from, echoed back in outputs
    priority: int = 0
    kv_transfer_params: KVTransferParams | None = None  # a prefill/decode hand-off (rtpjax.disagg)


class Abort(_Message, tag="abort"):
    request_id: str


class Stop(_Message, tag="stop"):
    """Finish the step in flight and exit."""


# -- outputs ---------------------------------------------------------------------------------------------------------
# One StepOutputs per engine step carries one RequestDelta per request with news. The per-request parts travel as
# arrays rather than maps: at hundreds of streams a step, field names repeated in each would double the message.


class CompletionDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one of a request's n completions added since its last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None  # per new token: {token: logprob} (asked-for requests only)
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


class RequestTimings(msgspec.Struct, gc=False):
    """A finished request's timings, in seconds after its arrival (offsets mean the same on any host)."""

    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    inter_token_latencies: list[float] = []


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request's news from one step; the front end adds it to what it already holds."""

    request_id: str
    finished: bool
    completions: list[CompletionDelta]
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with the request's first delta only
    timings: RequestTimings | None = None  # with its last delta only
    kv_transfer_params: KVTransferParams | None = None  # prefill role: where its decode engine pulls the K/V
    # A hand-off's phases (phase -> time.monotonic(), a clock the processes of one host share), with the delta that
    # first reports tokens (decode side) or hands the request over (prefill side): where its time to first token goes.
    trace: dict[str, float] | None = None


class RequestError(msgspec.Struct, gc=False):
    """A request that failed in the engine; it is the engine's last word on that request.

    kind: "invalid" (the request is bad: the front end raises ValueError), "protocol" (its message could not be read)
    or "engine" (the engine failed): both RuntimeError."""

    request_id: str
    kind: Literal["invalid", "protocol", "engine"]
    message: str

    def exception(self) -> Exception:
        return ValueError(self.message) if self.kind == "invalid" else RuntimeError(self.message)


class StepOutputs(_Message, tag="step"):
    """Everything one engine step has for the front end."""

    outputs: list[RequestDelta]
    errors: list[RequestError]
    stats: EngineStats
    kv_events: list[KVEvent] = []  # the prefix cache's changes in this step (engines with KV events on)


# -- multi-host: the leader's device work, replayed by its followers (rtpjax.distributed.multihost) ---------------------


class Hello(_Message, tag="hello"):
    """A follower's first message on the step channel."""

    process_id: int


class Heartbeat(_Message, tag="heartbeat"):
    """Sent each way about once a second: silence for longer than the peer timeout means the other side is gone."""


class FollowStep(_Message, tag="follow_step"):
    """One step as the leader dispatched it: its buckets, its packed inputs (runner/step_inputs.pack's int32 buffers,
    little-endian bytes) and its sampler variant."""

    num_tokens: int
    num_seqs: int
    inputs: bytes
    sampling: bytes
    mode: str  # sampler.Variant
    logprobs: bool
    steps: int = 1  # > 1: a multi-step decode (runner/multi_step.py), num_seqs its sequence bucket


class FollowAdmit(_Message, tag="follow_admit"):
    """Sampler state rows rebuilt for penalised sequences (ModelRunner._admit_arrays)."""

    rows: list[int]
    tokens: list[int]
    token_rows: list[int]
    is_output: list[bool]


class FollowScore(_Message, tag="follow_score"):
    """A prompt's logprobs computed (the followers run the same program and drop the result)."""

    prompt_ids: list[int]
    top_n: int


Message = Union[Startup, Ready, Failed, AddRequest, Abort, Stop, StepOutputs, Hello, Heartbeat, FollowStep,
                FollowAdmit, FollowScore]  # fmt: skip

# -- encoding --------------------------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    try:
        return _encoder.encode(message)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as e:  # ValueError: a lone surrogate
        kind, request_id = _tag(type(message)), getattr(message, "request_id", None)
        raise ProtocolError(f"cannot encode {type(message).__name__}: {e}", kind, request_id) from None


def decode(data: bytes, expected: tuple[type, ...] | type | None = None) -> Message:
    """The message in `data`, which must be one of `expected` (any message if None)."""
    try:
        message = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        kind, request_id = _names(data)
        named = "message" if kind is None else f"{kind!r} message"
        raise ProtocolError(f"malformed {named}: {e}", kind, request_id) from None
    if expected is not None and not isinstance(message, expected):
        kind, expected = _tag(type(message)), expected if isinstance(expected, tuple) else (expected,)
        names = ", ".join(repr(_tag(t)) for t in expected)
        request_id = getattr(message, "request_id", None)
        raise ProtocolError(f"unexpected {kind!r} message (expected {names})", kind, request_id)
    return message


def _tag(message_type: type) -> str:
    return message_type.__struct_config__.tag


def _names(data: bytes) -> tuple[str | None, str | None]:
    """The kind and request id a message that failed to decode still shows."""
    try:
        raw = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return None, None
    kind, request_id = (raw.get("type"), raw.get("request_id")) if isinstance(raw, dict) else (None, None)
    return (kind if isinstance(kind, str) else None), (request_id if isinstance(request_id, str) else None)


def to_monotonic(wall_time: float) -> float:
    """A wall-clock time from the wire on this process's monotonic clock (what RequestMetrics counts in); a time
    ahead of this host's clock (skew between hosts) counts as now."""
    return time.monotonic() - max(0.0, time.time() - wall_time)


# -- K/V hand-off channel (rtpjax.disagg.channel): a decode engine pulls a prefill engine's K/V --------------------


class KVPull(msgspec.Struct, gc=False):
    """Decode -> prefill: send me this hand-off's K/V, over this socket ("tcp"), through a shared-memory file ("shm"),
    or device to device ("device": the gathered pieces' device buffers, disagg/device_ipc)."""

    transfer_id: str
    channel: Literal["tcp", "shm", "device"]


class KVDevicePiece(msgspec.Struct, array_like=True, gc=False):
    """One gathered piece exported device to device: `nbytes` at `offset` in the device allocation of `handle`, rows
    [rows, block_bytes] of which the first `real` are the prompt's blocks, their device checksum (device_ipc.checksum)."""

    handle: bytes
    offset: int
    nbytes: int
    rows: int
    real: int
    checksum: list[int]


class KVOffer(msgspec.Struct, gc=False):
    """Prefill -> decode: what follows (the payload on the socket, or the file to read), or why nothing does.

    The payload is the blocks as packed rows (block_copy.pack: layout.block_bytes each), `sizes` its one length, in
    successive `chunk`-byte pieces (whole rows), each announced by a KVChunk once the prefill side has staged it."""

    error: str | None = None
    layout: KVLayout | None = None
    num_blocks: int = 0
    num_tokens: int = 0  # leading prompt positions whose K/V the blocks hold
    prompt_ids: list[int] = []
    sizes: list[int] = []
    chunk: int = 0
    shm_path: str | None = None
    device: list[KVDevicePiece] = []  # the "device" channel: no KVChunks follow, the pieces are copied from these


class KVChunk(msgspec.Struct, gc=False):
    """Prefill -> decode, after a KVOffer, once per piece: it is staged (over TCP its bytes follow); its crc32, checked
    on arrival. Or why the rest never comes."""

    checksum: int = 0
    error: str | None = None


class KVPulled(msgspec.Struct, gc=False):
    """Decode -> prefill: the payload is read and on the device (the prefill side may reuse its shared-memory file)."""

    ok: bool
