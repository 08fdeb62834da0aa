"""The engine loop in a process of its own, so that the HTTP front end and the engine never share one GIL.

This is vLLM V1's split. The server's process keeps uvicorn, tokenizing, validation and SSE; this process keeps
scheduling, the device step and detokenizing (stop strings are matched where the text is made). Requests go in
tokenized and validated (AddRequest); outputs come back once per step as deltas (new token ids, text and logprobs;
StepOutputs), which the front end accumulates, so a step's message does not grow with the sequences' lengths. Every
message is a typed msgpack frame (rtpjax.distributed.messages).

The child starts as `python -c` on the parent's sys.path (never re-importing the user's `__main__`, which
multiprocessing's spawn does), talks over one socket pair, ignores SIGINT (the parent decides when it stops, after a
graceful shutdown), and exits when the parent's end of the socket closes, so it never outlives the server.
"""

from __future__ import annotations

import cProfile
import dataclasses
import gc
import logging
import os
import pstats
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import msgspec

from rtpjax.distributed import messages
from rtpjax.distributed.messages import (Abort, AddRequest, EngineStats, Failed, Message, ModelInfo, ProtocolError,
                                         Ready, RequestDelta, RequestError, Startup, StepOutputs, Stop, to_monotonic)
from rtpjax.engine.core import EngineArgs, LLMEngine
from rtpjax.engine.request import CompletionOutput, RequestOutput
from rtpjax.engine.stall_meter import StallMeter
from rtpjax.engine.sequence import RequestMetrics
from rtpjax.progress import stacks_on_sigusr1

log = logging.getLogger("rtpjax")
REPORT_EVERY_S = 10.0  # how often a busy engine logs where its loop's time goes
# How long another thread (KV tiers' writers and loaders, hand-offs) may hold the GIL while the engine's loop waits
# for it: the loop gives the GIL up at every device call, and at Python's default (5 ms) it can wait that long to get
# it back each time. RTPJAX_ENGINE_SWITCH_INTERVAL overrides (seconds).
SWITCH_INTERVAL_S = 0.0005


def switch_interval() -> float:
    value = os.environ.get("RTPJAX_ENGINE_SWITCH_INTERVAL")
    if value is None:
        return SWITCH_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"RTPJAX_ENGINE_SWITCH_INTERVAL must be a positive number of seconds, got {value!r}")
    return seconds
# A round that could run nothing (only KV tier loads pending) waits this long for a command. A staged load wakes the
# loop at once (KVTiers.wake), but a load held back by the staging bound or the pool's room only starts when a round
# polls it, so the wait stays short.
STALLED_WAIT_S = 0.002
STALLED_REPORT_S = 0.1  # and reports (stats) to the server at most this often


# -- the front end's side of the wire ------------------------------------------------------------------------------


@dataclasses.dataclass
class Accumulator:
    """The front end's running totals of one request: adds the engine's RequestDeltas up into cumulative
    RequestOutputs."""

    prompt: str | None
    prompt_ids: list[int]
    arrival: float  # on this process's monotonic clock
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[dict] | None]
    prompt_logprobs: list | None = None
    trace: dict[str, float] | None = None  # a hand-off's phases (RequestDelta.trace), as they come

    @classmethod
    def of(cls, request: AddRequest) -> "Accumulator":
        n, want_lp = request.params.n, request.params.logprobs is not None
        return cls(request.prompt, request.prompt_ids, to_monotonic(request.arrival_time), [""] * n,
                   [[] for _ in range(n)], [[] if want_lp else None for _ in range(n)])  # fmt: skip

    def output(self, delta: RequestDelta) -> RequestOutput:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        outs = []
        for d in delta.completions:
            i = d.index
            self.texts[i] += d.text
            self.token_ids[i] += d.token_ids
            if d.logprobs is not None:
                self.logprobs[i] += d.logprobs
            outs.append(CompletionOutput(
                index=i, text=self.texts[i], token_ids=list(self.token_ids[i]),
                logprobs=list(self.logprobs[i]) if self.logprobs[i] is not None else None,
                finish_reason=d.finish_reason, stop_reason=d.stop_reason, delta_text=d.text,
                delta_token_ids=d.token_ids, delta_logprobs=d.logprobs,
            ))  # fmt: skip
        metrics = RequestMetrics.from_timings(self.arrival, delta.timings) if delta.timings is not None else None
        transfer = msgspec.to_builtins(delta.kv_transfer_params) if delta.kv_transfer_params is not None else None
        if delta.trace is not None:
            self.trace = {**(self.trace or {}), **delta.trace}
        return RequestOutput(delta.request_id, self.prompt, self.prompt_ids, outs, delta.finished, metrics,
                             self.prompt_logprobs, transfer, self.trace)  # fmt: skip


# -- the child --------------------------------------------------------------------------------------------------------

_COMMANDS = (AddRequest, Abort, Stop)


def _command(data: bytes) -> AddRequest | Abort | Stop | RequestError | None:
    """One message from the front end as a command. One the engine cannot read is logged and skipped (frames keep
    the stream in step, so the next message reads fine); for a request it could not add, that request's error
    stands in (only then: an id in any other message may be a request the engine runs on)."""
    try:
        return messages.decode(data, _COMMANDS)
    except ProtocolError as e:
        log.error("rejected a message from the front end: %s", e)
        if e.kind != "add" or e.request_id is None:
            return None
        return RequestError(e.request_id, "protocol", f"engine error: {e}")


def _receive(conn: Connection, commands: queue.Queue) -> None:
    """Drains the socket as commands arrive, so the parent's writes never wait for a step to end."""
    try:
        while True:
            command = _command(conn.recv_bytes())
            if command is not None:
                commands.put(command)
    except (EOFError, OSError):
        pass  # the parent is gone
    except Exception:  # a bug here would leave the engine idle for good, its requests unheard: stop it instead
        log.exception("the engine's command reader failed; stopping the engine")
    commands.put(Stop())


def _add(engine: LLMEngine, request: AddRequest) -> RequestError | None:
    """A request that fails here fails alone."""
    try:
        engine.add(engine.maker.build(request))
    except ValueError as e:
        return RequestError(request.request_id, "invalid", str(e))
    except Exception as e:  # noqa: BLE001 - e.g. prompt logprobs out of device memory
        log.exception("could not add request %s", request.request_id)
        return RequestError(request.request_id, "engine", f"engine error: {type(e).__name__}: {e}")
    return None


def _handoff(engine: LLMEngine, inbox: queue.Queue):
    """The prefill/decode hand-off side of this engine (rtpjax.disagg); it wakes the loop with a None command."""
    from rtpjax.disagg.handoff import Handoff

    return Handoff(engine, wake=lambda: inbox.put(None))


def _serve(engine: LLMEngine, conn: Connection) -> None:
    """Commands in, one StepOutputs out per round. Returns on Stop or once the parent is gone."""
    inbox: queue.Queue = queue.Queue()
    handoff = _handoff(engine, inbox)
    if engine.tiers is not None:  # a loaded sequence wakes a loop that waits for loads (a None command)
        engine.tiers.wake = lambda: inbox.put(None)
    try:
        _loop(engine, conn, inbox, handoff)
    finally:
        handoff.close()


def _loop(engine: LLMEngine, conn: Connection, inbox: queue.Queue, handoff) -> None:
    threading.Thread(target=_receive, args=(conn, inbox), name="rtpjax-commands", daemon=True).start()
    meter = StallMeter()
    try:
        _rounds(engine, conn, inbox, handoff, meter)
    finally:
        meter.close()


def _rounds(engine: LLMEngine, conn: Connection, inbox: queue.Queue, handoff, meter: StallMeter) -> None:
    reported = sent = time.monotonic()
    stalled = False
    while True:
        if engine.loop_stats.steps and time.monotonic() - reported >= REPORT_EVERY_S:
            s = engine.stats()
            log.info("engine: %s; %d running, %d waiting%s, KV cache %.0f%% used, %d preemptions since start; "
                     "%s", engine.take_loop_stats().report(time.monotonic() - reported),
                     s.num_running, s.num_waiting,
                     f" ({s.num_loading} loading from KV tiers)" if engine.tiers is not None else "",
                     100 * s.kv_cache_usage, s.num_preemptions, meter.report())  # fmt: skip
            if engine.tiers is not None:
                log.info("engine: %s", engine.tiers.report())
            reported = time.monotonic()
        commands = []
        if not engine.has_work() or stalled:  # idle, or only waiting for KV tier loads: no spinning, no flood
            try:
                commands.append(inbox.get(timeout=STALLED_WAIT_S if stalled else handoff.idle_wait()))
            except queue.Empty:
                pass
        while not inbox.empty():
            commands.append(inbox.get_nowait())
        outputs, errors = handoff.poll()
        for command in commands:
            if command is None:
                continue  # a wake-up: a hand-off's K/V arrived, or a KV tier load
            if isinstance(command, Stop):
                return
            if isinstance(command, AddRequest):
                error = _add(engine, command) if command.kv_transfer_params is None else handoff.add(command)
                if error is not None:
                    errors.append(error)
            elif isinstance(command, Abort):
                out = engine.abort(command.request_id, as_deltas=True) or handoff.abort(command.request_id)
                if out is not None:
                    outputs.append(out)
            else:  # the error of a request whose message could not be read
                errors.append(command)
        if outputs:  # hand-offs' first tokens (handoff.poll): out now, not after this round's step is launched
            conn.send_bytes(messages.encode(StepOutputs(outputs, [], handoff.stats(engine.stats()), [])))
            outputs = []
        if engine.has_work():
            try:
                outputs += engine.step(as_deltas=True)
            except Exception as e:  # a bug must not kill the loop: fail what was in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                for request_id in list(engine.requests):
                    engine.abort(request_id)
                    errors.append(RequestError(request_id, "engine", f"engine error: {type(e).__name__}: {e}"))
                engine.reset_inflight()
        outputs += handoff.after_step()
        events = engine.pool.drain_events()
        stalled = engine.has_work() and engine.inflight is None and not (outputs or errors or events or commands)
        if stalled and time.monotonic() - sent < STALLED_REPORT_S:
            continue  # nothing new to tell: the server hears of this engine again once something moves
        sent = time.monotonic()
        conn.send_bytes(messages.encode(StepOutputs(outputs, errors, handoff.stats(engine.stats()), events)))


def _exit_with_parent(parent: int) -> None:
    """While the engine loads and compiles nobody reads the socket: exit as soon as the parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def child_main(fd: int, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stacks_on_sigusr1()
    threading.Thread(target=_exit_with_parent, args=(parent,), name="rtpjax-parent-watch", daemon=True).start()
    conn = Connection(fd)
    startup = messages.decode(conn.recv_bytes(), Startup)
    logging.basicConfig(level=startup.log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    logging.getLogger("jax").setLevel(max(startup.log_level, logging.WARNING))  # not its probe for TPU backends
    try:
        sys.setswitchinterval(switch_interval())
        engine = LLMEngine(startup.model, EngineArgs(**startup.engine_args))
    except (ValueError, OSError) as e:  # bad options or files: the parent raises the message alone, as one line
        conn.send_bytes(messages.encode(Failed(str(e), traceback.format_exc(), user_error=True)))
        return
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it where the user called
        conn.send_bytes(messages.encode(Failed(f"{type(e).__name__}: {e}", traceback.format_exc())))
        return
    freeze_heap()
    conn.send_bytes(messages.encode(Ready(engine.info, engine.stats())))
    profile = os.environ.get("RTPJAX_ENGINE_PROFILE")  # a path: cProfile the engine's loop, for benchmarks
    profiler = cProfile.Profile() if profile else None
    try:
        if profiler is not None:
            profiler.enable()
        _serve(engine, conn)
    except (EOFError, OSError):
        pass  # the parent is gone
    finally:
        try:
            if profiler is not None:
                _write_profile(profiler, profile)
        except OSError as e:
            log.error("RTPJAX_ENGINE_PROFILE: could not write %s: %s", profile, e)
        engine.close()  # KV tiers: the prefix cache goes down to disk for the next start


def freeze_heap() -> int:
    """Move every object loading made (modules, traced programs, the tokenizer) out of Python's cyclic collector: a
    full collection while serving stops every thread for as long as it scans, and now scans only what serving made.
    The engine's own process only: cycles among frozen objects are never collected, which a user's process must not
    inherit."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%d objects made while loading left out of the garbage collector's passes", frozen)
    return frozen


def _write_profile(profiler: cProfile.Profile, path: str) -> None:
    """The loop's profile as pstats (`path`) and its top functions by own and by total time (`path`.txt)."""
    profiler.disable()
    profiler.dump_stats(path)
    with open(path + ".txt", "w") as f:
        for order in ("tottime", "cumulative"):
            pstats.Stats(profiler, stream=f).sort_stats(order).print_stats(40)


# -- the parent's handle ----------------------------------------------------------------------------------------------


class EngineProcess:
    """Starts the engine process and waits until it is ready (weights loaded, steps compiled)."""

    def __init__(self, model: str, args: EngineArgs):
        ours, theirs = socket.socketpair()
        path = [p for p in sys.path if isinstance(p, str)]
        bootstrap = f"import sys; sys.path[:0] = {path!r}; from rtpjax.distributed.engine_process import child_main; " \
                    f"child_main({theirs.fileno()}, {os.getpid()})"  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-c", bootstrap], pass_fds=(theirs.fileno(),),
                                     start_new_session=True)  # fmt: skip
        theirs.close()
        self.conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        try:
            self.send(Startup(model, dataclasses.asdict(args), logging.getLogger("rtpjax").getEffectiveLevel()))
            reply = self.recv((Ready, Failed))
        except (EOFError, OSError):
            self.proc.wait()
            raise RuntimeError(f"the engine process exited with code {self.proc.returncode} while starting") from None
        except BaseException:  # interrupted while waiting: the child must not go on loading for minutes
            self.proc.kill()
            self.proc.wait()
            raise
        if isinstance(reply, Failed):
            self.proc.wait()
            if reply.user_error:
                log.debug("the engine process could not start:\n%s", reply.traceback)
                raise ValueError(reply.message)
            raise RuntimeError(f"the engine process failed to start: {reply.message}\n{reply.traceback}")
        self.info: ModelInfo = reply.info
        self.stats: EngineStats = reply.stats

    def send(self, message: Message) -> None:
        """Raises ProtocolError for a message that cannot be encoded (nothing is sent), OSError once the engine is
        gone."""
        self.send_frame(messages.encode(message))

    def send_frame(self, data: bytes) -> None:
        with self._send_lock:
            self.conn.send_bytes(data)

    def recv(self, expected) -> Message:
        """The next message from the engine, one of `expected`; EOFError once the engine is gone."""
        return messages.decode(self.conn.recv_bytes(), expected)

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.send(Stop())
        except OSError:
            pass  # already gone
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
