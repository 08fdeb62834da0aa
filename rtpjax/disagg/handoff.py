"""Prefill/decode hand-off inside the engine process: the engine loop's side of both roles.

Prefill (`AddRequest.kv_transfer_params.do_remote_decode`): the request runs as any other. Right behind the step that
computes its prompt's last chunk, the device gathers its prompt blocks as packed rows (`ModelRunner.offload`, ordered
after that step and before anything later writes the blocks). Once each completion has its first token (no step runs
past it: Sequence.hand_off) a hand-off thread starts the rows' copies to the host and stages them (staging.stage:
shared memory, checksums) while the loop goes on (an engine on a CUDA GPU keeps them on the device instead, for a
decode engine of its host to copy device to device, and stages them only for a pull that asks for a host path); not
sooner, as a large device-to-host copy queued behind the step would go ahead of the copy of its sampled tokens and
delay the first token. The request leaves the engine (`LLMEngine.snapshot(detach=True, gather=False)`): its blocks go
back to the pool at once (the gathered copy is its own), and its last output carries the kv_transfer_params a decode
engine needs. What no decode engine pulls within kv_transfer_timeout is dropped; a request that finishes at its first
token (EOS, a stop string) or is aborted hands nothing over (its decode engine recomputes the prompt).

Decode (`do_remote_prefill`): the request reserves the blocks its prompt needs (waiting, up to kv_transfer_timeout,
for room; then it is refused), a thread pulls the K/V (device to device from a CUDA engine of this host, else each
chunk going to the device as it arrives), and once it has arrived the reservation is returned and the request is added
with the rows on the device (Sequence.host_kv: written into fresh blocks before its first step, as an adopted
request's). The prefill hands over the whole prompt's K/V and its first token (kv_transfer_params.first_token_ids): a
request of one completion without logprobs reports that token at once and its first step samples the second, so it
goes on from what a client was shown first (rtpjax's P/D router streams the prefill's token); any other runs the last
prompt token again and samples the first token. Sampling is keyed by (seed, position), so a seeded or greedy request
continues exactly as it would have colocated. A pull that fails (prefill gone, corrupted, stale, another prompt) makes
the request compute its prompt here instead: slower, never wrong. Each hand-off's phases (time.monotonic()) leave with
its answer (prefill) or its first tokens (decode) as RequestDelta.trace.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import uuid

import jax
import numpy as np

from rtpjax.disagg import channel, device_ipc, staging
from rtpjax.disagg.params import role_error, side
from rtpjax.disagg.relayout import pack, relayout, unpack
from rtpjax.distributed.messages import (AddRequest, CompletionDelta, KVTransferParams, RequestDelta,
                                         RequestError)  # fmt: skip
from rtpjax.engine.core import traced
from rtpjax.engine.request import Request
from rtpjax.engine.sequence import PENDING, HostKV
from rtpjax.kv.block_copy import rows_to_host
from rtpjax.kv.host_blocks import PackedBlocks

log = logging.getLogger("rtpjax")
DEVICE_HOLD_BYTES = 2 << 30  # prefill: hand-offs kept on the device for a device pull, at most (the rest are staged)


@dataclasses.dataclass
class _Gathered:
    """A prefill's prompt K/V as packed rows: on the device until its first token is read, then staging."""

    num_tokens: int
    num_blocks: int
    pieces: list  # (real rows, uint8 [bucket, block_bytes] device array)
    staged: staging.Staged | None = None


@dataclasses.dataclass
class _Pull:
    request: Request
    params: KVTransferParams
    need: int  # blocks the prompt's K/V takes here
    deadline: float  # time.monotonic()
    reserved: list[int] | None = None  # taken from the pool while the K/V travels


def _first_token(request: Request, params: KVTransferParams, vocab_size: int | None = None) -> int | None:
    """The prefill's first token, where the decode side goes on from it: one completion without logprobs (a token's
    logprobs are not handed over), a token of the vocabulary."""
    first = params.first_token_ids
    if first is None or len(first) != 1 or len(request.seqs) != 1 or request.params.logprobs is not None:
        return None
    return first[0] if vocab_size is None or 0 <= first[0] < vocab_size else None


def _closing(request: Request, reason: str, params: KVTransferParams | None = None) -> RequestDelta:
    """The last delta of a request that leaves this engine outside a step: its running completions end."""
    ended = [CompletionDelta(s.index, "", [], None, reason) for s in request.seqs if not s.finished]
    return RequestDelta(request.request_id, True, ended, timings=request.seqs[0].metrics.timings(),
                        kv_transfer_params=params)  # fmt: skip


def _ipc_device(engine):
    """The one device of this engine's cache if its K/V can go device to device to another process (disagg/device_ipc;
    RTPJAX_KV_DEVICE_IPC=0 keeps hand-offs on the host paths), else None."""
    devices = engine.runner.cache[0][0].sharding.device_set
    if os.environ.get("RTPJAX_KV_DEVICE_IPC", "1") == "0" or len(devices) != 1:
        return None
    device = next(iter(devices))
    return device if device_ipc.available(device) else None


class Handoff:
    """Both roles' hand-off state of one engine. The engine loop calls add / abort / poll / after_step; pull threads
    and the transfer server run beside it. `wake()` rouses an idle engine loop (a pull arrived)."""

    def __init__(self, engine, wake):
        args = engine.args
        self.engine, self.wake, self.role = engine, wake, args.role
        self.timeout = args.kv_transfer_timeout
        self.engine_id, self.host_id = uuid.uuid4().hex, channel.host_id()
        self.store = staging.HeldStore()
        self._server = None
        if self.role == "prefill":  # a role "both" engine opens its port when it first holds K/V
            self.server  # noqa: B018 - a port that cannot be bound fails the start
        self.holding: set[str] = set()  # prefill: requests to detach once every completion has its first token
        self.gathering: dict[str, _Gathered] = {}  # prefill: the gathered prompt K/V by request
        self.times: dict[str, list[float]] = {}  # phase -> [seconds, hand-offs]: where a hand-off's time goes
        self._times_lock = threading.Lock()
        if self.role != "both":  # a role "both" engine compiles its packed copies at its first hand-off
            kind = "gather_packed" if self.role == "prefill" else "write_packed"
            engine.runner.copier.compile_packed(engine.runner.cache, kind)
        self.ipc_device = _ipc_device(engine)  # K/V of this engine can go device to device (this host)
        self.no_ipc: set[tuple[str, int]] = set()  # decode: prefill engines whose device copies failed here
        self.pulls: dict[str, _Pull] = {}  # decode: requests whose K/V is reserved for or on its way
        self.arrived: queue.Queue = queue.Queue()  # (request id, Pulled | TransferError) from pull threads
        self.pulled = self.failed = 0

    @property
    def server(self) -> channel.TransferServer:
        if self._server is None:
            args = self.engine.args
            self._server = channel.TransferServer(self.store, args.kv_transfer_host, args.kv_transfer_port)
        return self._server

    @property
    def num_held(self) -> int:
        return len(self.store)

    def stats(self, stats):
        """The engine's gauges with the hand-off counters filled in."""
        stats.kv_transfers_held, stats.kv_transfers_pulled, stats.kv_transfers_failed = \
            self.num_held, self.pulled, self.failed  # fmt: skip
        with self._times_lock:
            stats.kv_transfer_ms = {phase: 1e3 * total / n for phase, (total, n) in self.times.items()}
        return stats

    def _time(self, phase: str, seconds: float) -> None:
        with self._times_lock:
            total, n = self.times.get(phase, (0.0, 0))
            self.times[phase] = [total + seconds, n + 1]

    def idle_wait(self) -> float | None:
        """How long an idle engine loop may sleep: held K/V must expire, waiting pulls must time out."""
        return 1.0 if (self.num_held or self.pulls) else None

    # -- commands -------------------------------------------------------------------------------------------------

    def add(self, command: AddRequest) -> RequestError | None:
        """A request that carries kv_transfer_params."""
        params, rid = command.kv_transfer_params, command.request_id
        want, error = side(params), role_error(self.role, params)
        if error is not None:
            return RequestError(rid, "invalid", error)
        try:
            request = self.engine.maker.build(command)
        except ValueError as e:
            return RequestError(rid, "invalid", str(e))
        request.trace["added"] = time.monotonic()
        if want == "prefill":
            if self.engine.runner.mirror is not None:
                return RequestError(rid, "invalid", "K/V hand-off works in one process only (not multi-host)")
            for seq in request.seqs:  # not finished by its first token (it leaves then), nor stepped past it
                seq.max_tokens = max(seq.max_tokens, min(2, self.engine.max_model_len - seq.num_prompt))
                seq.hand_off = True
            self.holding.add(rid)
        elif want == "decode" and params.remote_host is not None and params.remote_port is not None:
            rerun = _first_token(request, params, self.engine.info.vocab_size) is None  # the last prompt token again
            need = -(-(len(request.prompt_ids) - rerun) // self.engine.args.block_size)
            if need > self.engine.pool.num_blocks:
                return RequestError(rid, "invalid", f"the prompt needs {need} KV blocks; this decode engine's "
                                                    f"cache has {self.engine.pool.num_blocks}")  # fmt: skip
            if need:
                self.pulls[rid] = _Pull(request, params, need, time.monotonic() + self.timeout)
                self._start(rid)
                return None
        return self._add(request)

    def abort(self, request_id: str) -> RequestDelta | None:
        """A request the engine itself does not hold: one whose K/V is on its way or held for a decode engine."""
        self.holding.discard(request_id)
        self._unstage(request_id)
        pull = self.pulls.pop(request_id, None)
        if pull is not None:
            self._unreserve(pull)
            return _closing(pull.request, "abort")
        held = self.store.take(request_id)
        if held is not None:
            held.release()
        return None

    # -- the loop -------------------------------------------------------------------------------------------------

    def poll(self) -> tuple[list[RequestDelta], list[RequestError]]:
        """Before a step: arrived K/V joins the engine (with the prefill's first token, reported at once), waiting
        pulls start or time out, held K/V expires."""
        outputs, errors = [], []
        while not self.arrived.empty():
            rid, result, pulled = self.arrived.get_nowait()
            pull = self.pulls.pop(rid, None)
            if pull is not None:
                self._unreserve(pull)
                first = _first_token(pull.request, pull.params, self.engine.info.vocab_size)
                self._adopt(pull, result, first is not None)
                pull.request.trace.update(pulled=pulled, adopted=time.monotonic())
                if first is not None:
                    pull.request.seqs[0].token_ids.append(first)  # read by _first once the engine holds it
                error = self._add(pull.request)
                if error is not None:
                    errors.append(error)
                elif first is not None:
                    outputs.append(self._first(pull.request, first))
        now = time.monotonic()
        for rid, pull in list(self.pulls.items()):
            if pull.reserved is None and not self._start(rid) and now > pull.deadline:
                del self.pulls[rid]
                errors.append(RequestError(rid, "engine", f"no room in this decode engine's KV cache for the "
                                                          f"prompt's {pull.need} blocks within {self.timeout:g} s"))
        for rid in self.store.expire():
            log.warning("dropped the K/V of hand-off %s: no decode engine pulled it within %g s", rid, self.timeout)
        return outputs, errors

    def after_step(self) -> list[RequestDelta]:
        """After a step: gather the prompts whose last chunk it computes, detach the prefill requests whose
        completions all have their first token."""
        if self.holding and self.engine.inflight is not None:
            for item in self.engine.inflight[0].items:
                seq = item.seq
                if seq.request_id in self.holding and seq.request_id not in self.gathering and \
                        item.start + item.num_tokens >= seq.num_prompt:  # fmt: skip
                    self._gather(seq)
        outputs = []
        for rid in list(self.holding):
            request = self.engine.requests.get(rid)
            if request is None:  # finished at its first token (or aborted): nothing to hand over
                self.holding.discard(rid)
                self._unstage(rid)
                continue
            if not all(s.finished or (s.num_generated and s.token_ids[s.num_prompt] != PENDING) for s in request.seqs):
                continue
            self.holding.discard(rid)
            outputs.append(self._detach(request))
        return outputs

    # -- prefill --------------------------------------------------------------------------------------------------

    def _gather(self, seq) -> None:
        """Queue the device copy of the prompt's blocks (the whole prompt's K/V) right behind the step in flight, in
        pieces of about one checksum chunk (a power of two: a gather bucket, no padding): a hand-off thread will stage
        each piece while the next is still crossing to the host."""
        tokens = seq.num_prompt
        blocks = seq.block_table[: -(-tokens // self.engine.args.block_size)]
        if not blocks:
            return
        trace = self.engine.requests[seq.request_id].trace
        trace["gather_began"] = time.monotonic()  # right after the prompt's last step was launched
        layout = self.engine.runner.kv_layout
        fit = staging.CHUNK // layout.block_bytes
        step = max(self.engine.runner.copier.sizes[0], 1 << max(0, fit.bit_length() - 1))
        offload = self.engine.runner.offload
        pieces = [p for i in range(0, len(blocks), step) for p in offload(blocks[i : i + step], download=False)]
        self.gathering[seq.request_id] = _Gathered(tokens, len(blocks), pieces)
        trace["gather_queued"] = time.monotonic()

    def _stage(self, gathered: _Gathered) -> staging.Staged:
        """The host copies of the gathered rows, started and staged on a hand-off thread."""
        gathered.staged = self.store.stage(gathered.pieces, self.engine.runner.kv_layout,
                                           self.engine.runner.copier.download)  # fmt: skip
        gathered.pieces = []
        gathered.staged.done.add_done_callback(self._staged)
        return gathered.staged

    def _staged(self, future) -> None:
        if future.exception() is None:
            d2h, copy = future.result()
            self._time("prefill_d2h", d2h)
            self._time("prefill_stage", copy)

    def _unstage(self, rid: str) -> None:
        gathered = self.gathering.pop(rid, None)
        if gathered is not None and gathered.staged is not None:
            gathered.staged.release()

    def _detach(self, request: Request) -> RequestDelta:
        closing = _closing(request, "length")
        closing.trace = traced(request)
        rid = request.request_id
        self.engine.snapshot(rid, detach=True, gather=False)  # its blocks go back: the gathered copy is its own
        gathered = self.gathering.pop(rid, None)
        if gathered is None:
            return closing  # a one-token prompt: nothing worth handing over
        num_blocks, held_bytes = gathered.num_blocks, sum(a.nbytes for _, a in gathered.pieces)
        ipc = self.ipc_device is not None and self.store.device_bytes() + held_bytes <= DEVICE_HOLD_BYTES
        held = staging.Held(self.engine.runner.kv_layout, num_blocks, gathered.num_tokens, list(request.prompt_ids),
                            time.monotonic() + self.timeout, None if ipc else self._stage(gathered))  # fmt: skip
        if ipc:  # kept on the device for a decode engine of this host; staged for the host paths when one asks
            held.pieces, held.stage = list(gathered.pieces), lambda: self._stage(gathered)
        self.store.put(rid, held)
        closing.kv_transfer_params = KVTransferParams(do_remote_prefill=True, remote_engine_id=self.engine_id,
                                  remote_request_id=rid, remote_block_ids=list(range(num_blocks)),
                                  remote_host=self.server.host, remote_port=self.server.port,
                                  remote_host_id=self.host_id, remote_device_ipc=ipc,
                                  tp_size=self.engine.args.tensor_parallel_size,
                                  first_token_ids=[s.token_ids[s.num_prompt] for s in request.seqs])  # fmt: skip
        return closing

    # -- decode ---------------------------------------------------------------------------------------------------

    def _start(self, rid: str) -> bool:
        """Reserve the pull's blocks and start it, if the pool has them."""
        pull = self.pulls[rid]
        pull.reserved = self.engine.pool.allocate(pull.need)
        if pull.reserved is None:
            return False
        pull.request.trace["reserved"] = time.monotonic()
        p = pull.params
        path = "shm" if p.remote_host_id == self.host_id else "tcp"
        if path == "shm" and p.remote_device_ipc and self.ipc_device is not None and \
                (p.remote_host, p.remote_port) not in self.no_ipc:  # fmt: skip
            path = "device"
        transfer_id = p.remote_request_id or rid
        tokens = len(pull.request.prompt_ids) - (_first_token(pull.request, p, self.engine.info.vocab_size) is None)
        threading.Thread(target=self._pull, args=(rid, p.remote_host, p.remote_port, transfer_id, path, pull.deadline,
                                                  tokens),
                         name="rtpjax-kv-pull", daemon=True).start()  # fmt: skip
        return True

    def _load(self, layout, rows):
        """Each arriving chunk of rows straight to the device, where they can enter this cache as they are; host
        copies where they must be re-laid out first."""
        if layout == self.engine.runner.kv_layout:
            return self.engine.runner.copier.put_rows(rows)
        return channel.host_rows(layout, rows)

    def _take_device(self, layout, copied: list, pieces: list) -> list:
        """Copied pieces as rows (of copies of them): the pieces go back to their pool once copied out."""
        unstage = self.engine.runner.copier.unstage
        rows = [row for array, piece in zip(copied, pieces) for row in unstage([array])[: piece.real]]
        jax.block_until_ready(rows)
        device_ipc.give_back(copied)
        return rows

    def _pull(self, rid: str, host: str, port: int, transfer_id: str, path: str, deadline: float, tokens: int) -> None:
        try:
            to = channel.DeviceLoad(self.ipc_device, self._take_device) if path == "device" else None
            result = channel.pull(host, port, transfer_id, path, deadline, self._load, to)
            for phase, seconds in result.times.items():
                self._time("decode_" + phase, seconds)
            target = self.engine.runner.kv_layout
            if result.layout != target:
                began = time.perf_counter()
                tokens = min(result.num_tokens, tokens)
                kv = relayout(unpack(result.layout, rows_to_host(result.rows)), tokens, target)
                result.rows = self.engine.runner.copier.put_rows(pack(kv))
                result.layout, result.num_tokens = target, tokens
                self._time("decode_relayout", time.perf_counter() - began)
        except channel.DeviceCopyError as e:
            log.warning("K/V from %s:%d goes through host memory from now on: %s", host, port, e)
            self.no_ipc.add((host, port))
            result = e
        except (channel.TransferError, ValueError) as e:
            result = e
        except Exception as e:  # noqa: BLE001 - e.g. the device out of memory: the prompt is computed here instead
            result = channel.TransferError(f"the K/V could not be put on the device: {type(e).__name__}: {e}")
        self.arrived.put((rid, result, time.monotonic()))
        self.wake()

    def _unreserve(self, pull: _Pull) -> None:
        if pull.reserved is not None:
            self.engine.pool.release(pull.reserved)
            pull.reserved = None

    def _adopt(self, pull: _Pull, result, whole: bool) -> None:
        """Give the request's first sequence the K/V of all but its last prompt token (`whole`: of the whole prompt,
        which its first token follows), or say why it recomputes."""
        request = pull.request
        prompt = request.prompt_ids
        try:
            if isinstance(result, Exception):
                raise result
            if time.monotonic() > pull.deadline:
                raise channel.TransferError("the K/V arrived after the hand-off's timeout (stale)")
            if result.prompt_ids != prompt:
                raise channel.TransferError("the hand-off holds another prompt's K/V")
            tokens = min(result.num_tokens, len(prompt) - (not whole))
        except (channel.TransferError, ValueError) as e:
            log.warning("request %s computes its prompt here: %s", request.request_id, e)
            self.failed += 1
            return
        self.pulled += 1
        rows = list(range(-(-tokens // result.layout.block_size)))
        request.seqs[0].host_kv = HostKV(PackedBlocks(result.layout, result.rows), rows, tokens)

    def _first(self, request: Request, token: int) -> RequestDelta:
        """The prefill's first token as this engine's own (text, stops, length), reported at once; the first step
        computes its K/V and samples the second."""
        seq = request.seqs[0]
        self.engine._accept(seq, seq.num_prompt, token, 0.0, None, None, time.monotonic())
        return self.engine._output(request, as_delta=True)

    def _add(self, request: Request) -> RequestError | None:
        try:
            self.engine.add(request)
        except ValueError as e:
            return RequestError(request.request_id, "invalid", str(e))
        return None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for rid in list(self.gathering):
            self._unstage(rid)
        self.store.close()
        channel.MAPPINGS.close()  # the decode side's kept (page-locked) mappings no pull is reading
