"""The engine loop in a process of its own, so that the HTTP front end and the engine never share one GIL.

This is vLLM V1's split. The server's process keeps uvicorn, tokenizing, validation and SSE; this process keeps
scheduling, the device step and detokenizing (stop strings are matched where the text is made). Requests go in
pickled; outputs come back once per step as deltas (new token ids, text and logprobs), which the front end
accumulates, so a step's message does not grow with the sequences' lengths.

The child starts as `python -c` on the parent's sys.path (never re-importing the user's `__main__`, which
multiprocessing's spawn does), talks over one socket pair, ignores SIGINT (the parent decides when it stops, after a
graceful shutdown), and exits when the parent's end of the socket closes, so it never outlives the server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from rtpjax.engine.request import CompletionOutput, ModelInfo, Request, RequestOutput
from rtpjax.engine.core import EngineArgs, LLMEngine, LoopStats

log = logging.getLogger("rtpjax")
REPORT_EVERY_S = 10.0  # how often a busy engine logs where its loop's time goes


# -- the front end's side of the wire ------------------------------------------------------------------------------


@dataclasses.dataclass
class Accumulator:
    """The front end's running totals of one request: turns the engine's delta tuples (`LLMEngine._delta`) back into
    cumulative RequestOutputs."""

    request: Request
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[dict] | None]
    prompt_logprobs: list | None = None

    @classmethod
    def of(cls, request: Request) -> "Accumulator":
        n, want_lp = len(request.seqs), request.params.logprobs is not None
        return cls(request, [""] * n, [[] for _ in range(n)], [[] if want_lp else None for _ in range(n)])

    def output(self, wire: tuple) -> RequestOutput:
        request_id, finished, metrics, prompt_logprobs, deltas = wire
        if prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs
        outs = []
        for index, text, ids, lps, finish_reason, stop_reason in deltas:
            self.texts[index] += text
            self.token_ids[index] += ids
            if lps is not None:
                self.logprobs[index] += lps
            outs.append(CompletionOutput(
                index=index, text=self.texts[index], token_ids=list(self.token_ids[index]),
                logprobs=list(self.logprobs[index]) if self.logprobs[index] is not None else None,
                finish_reason=finish_reason, stop_reason=stop_reason, delta_text=text, delta_token_ids=ids,
                delta_logprobs=lps,
            ))  # fmt: skip
        r = self.request
        return RequestOutput(request_id, r.prompt, r.prompt_ids, outs, finished, metrics, self.prompt_logprobs)


# -- the child --------------------------------------------------------------------------------------------------------


def _receive(conn: Connection, commands: queue.Queue) -> None:
    """Drains the socket as commands arrive, so the parent's writes never wait for a step to end."""
    try:
        while True:
            commands.put(conn.recv())
    except (EOFError, OSError):
        pass  # the parent is gone
    except Exception:  # noqa: BLE001 - a message that cannot be read: the stream is out of step, so stop
        log.exception("unreadable command from the front end; stopping")
    commands.put(("stop", None))


def _serve(engine: LLMEngine, conn: Connection) -> None:
    """Commands in, one message out per round: (outputs, errors, stats). Returns on "stop" or once the parent is
    gone."""
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_receive, args=(conn, inbox), name="rtpjax-commands", daemon=True).start()
    reported = time.monotonic()
    while True:
        if engine.loop_stats.steps and time.monotonic() - reported >= REPORT_EVERY_S:
            s = engine.stats()
            log.info("engine: %s; %d running, %d waiting, KV cache %.0f%% used",
                     engine.loop_stats.report(time.monotonic() - reported), s["num_running"], s["num_waiting"],
                     100 * s["kv_cache_usage"])  # fmt: skip
            engine.loop_stats, reported = LoopStats(), time.monotonic()
        commands = [inbox.get()] if not engine.has_work() else []
        while not inbox.empty():
            commands.append(inbox.get_nowait())
        outputs, errors = [], []
        for kind, arg, *blob in commands:
            if kind == "stop":
                return
            if kind == "add":  # (request id, pickled Request): a request that fails here fails alone
                try:
                    engine.add(pickle.loads(blob[0]))
                except ValueError as e:
                    errors.append((arg, e))
                except Exception as e:  # noqa: BLE001 - e.g. prompt logprobs out of device memory
                    log.exception("could not add request %s", arg)
                    errors.append((arg, RuntimeError(f"engine error: {type(e).__name__}: {e}")))
            elif kind == "abort":
                out = engine.abort(arg, as_deltas=True)
                if out is not None:
                    outputs.append(out)
        if engine.has_work():
            try:
                outputs += engine.step(as_deltas=True)
            except Exception as e:  # a bug must not kill the loop: fail what was in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                for request_id in list(engine.requests):
                    engine.abort(request_id)
                    errors.append((request_id, RuntimeError(f"engine error: {type(e).__name__}: {e}")))
                engine.reset_inflight()
        conn.send(("step", outputs, errors, engine.stats()))


def _exit_with_parent(parent: int) -> None:
    """While the engine loads and compiles nobody reads the socket: exit as soon as the parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def child_main(fd: int, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="rtpjax-parent-watch", daemon=True).start()
    conn = Connection(fd)
    model, engine_args, level = conn.recv()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    try:
        engine = LLMEngine(model, EngineArgs(**engine_args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it where the user called
        conn.send(("failed", f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    conn.send(("ready", engine.info, engine.stats()))
    try:
        _serve(engine, conn)
    except (EOFError, OSError):
        pass  # the parent is gone


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
            self.send((model, dataclasses.asdict(args), logging.getLogger("rtpjax").getEffectiveLevel()))
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.proc.wait()
            raise RuntimeError(f"the engine process exited with code {self.proc.returncode} while starting") from None
        except BaseException:  # interrupted while waiting: the child must not go on loading for minutes
            self.proc.kill()
            self.proc.wait()
            raise
        if reply[0] == "failed":
            self.proc.wait()
            raise RuntimeError(f"the engine process failed to start: {reply[1]}\n{reply[2]}")
        _, self.info, self.stats = reply
        self.info: ModelInfo

    def send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.send(("stop", None))
        except OSError:
            pass  # already gone
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
