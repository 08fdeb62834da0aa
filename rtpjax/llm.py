"""The Python APIs: LLM (blocking, batch) and AsyncLLM (async iterators), both driving LLMEngine.step.

AsyncLLM runs the loop in a process of its own (see engine_process), so a server's event loop never waits for the
engine's Python work; requests and aborts reach it over a socket and outputs come back to each caller's asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Sequence as Seq

import msgspec

from rtpjax.distributed.engine_process import Accumulator
from rtpjax.disagg.params import transfer_params
from rtpjax.distributed.messages import Abort, ProtocolError, RequestDelta, StepOutputs
from rtpjax.engine.core import EngineArgs, LLMEngine
from rtpjax.engine.request import RequestMaker, RequestOutput
from rtpjax.progress import configure_logging
from rtpjax.sampling_params import SamplingParams

log = logging.getLogger("rtpjax")


def _engine(model: str | None, engine_args: dict) -> LLMEngine:
    return LLMEngine(model, EngineArgs.from_kwargs(**engine_args))


class LLM:
    """Offline generation: `LLM(path).generate(prompts, SamplingParams(...))` -> one RequestOutput per prompt.

    `path`: a Hugging Face folder, a .gguf file, or nothing for the embedded SmolLM2-135M-Instruct.
    """

    def __init__(self, model: str | None = None, **engine_args):
        configure_logging()  # minutes of loading and compiling are never silent
        self.engine = _engine(model, engine_args)
        if self.engine.args.process_id > 0:  # a follower of a multi-host engine: replays the leader's steps, exits
            from rtpjax.distributed import multihost

            raise SystemExit(multihost.follow(self.engine))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 priority: Seq[int] | None = None) -> list[RequestOutput]:  # fmt: skip
        """prompts: a string, a list of token ids, or a list of either. Every prompt is validated before any runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        priority = priority or [0] * len(prompts)
        requests = [self.engine.make_request(p, sp, priority=pr) for p, sp, pr in zip(prompts, params, priority)]
        for request in requests:
            self.engine.add(request)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_work():
            for out in self.engine.step(final_only=True):
                done[out.request_id] = out
        return [done[r.request_id] for r in requests]


def _put_all(items) -> None:
    for stream, out in items:
        stream.put_nowait(out)


def _merge(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """`later` with `earlier`'s deltas in front: as if the two steps had been one."""
    before = {o.index: o for o in earlier.outputs}
    for o in later.outputs:
        e = before.get(o.index)
        if e is not None:
            o.delta_text = e.delta_text + o.delta_text
            o.delta_token_ids = e.delta_token_ids + o.delta_token_ids
            if o.delta_logprobs is not None and e.delta_logprobs is not None:
                o.delta_logprobs = e.delta_logprobs + o.delta_logprobs
    return later


class AsyncLLM:
    """Online generation: `async for out in llm.generate(prompt, params): ...` with incremental outputs.

    The engine runs in a process of its own (`rtpjax.distributed.engine_process`); this object is its front end: it tokenizes and
    validates in the caller's process, and one reader thread turns the engine's per-step deltas into each request's
    outputs. Mid-stream outputs carry `metrics=None`; the final one carries the request's timings.
    """

    def __init__(self, model: str | None = None, **engine_args):
        from concurrent.futures import ThreadPoolExecutor

        from rtpjax.distributed.engine_process import EngineProcess
        from rtpjax.loading.model_source import resolve_model
        from rtpjax.loading.tokenizer import load_tokenizer, tokenizer_source

        configure_logging()  # the engine process logs at this logger's level
        self.args = EngineArgs.from_kwargs(**engine_args)  # bad options fail here, before a process starts
        model = resolve_model(model)
        source = tokenizer_source(model, self.args.tokenizer, self.args.skip_tokenizer_init)  # so does no tokenizer
        with ThreadPoolExecutor(1) as pool:  # the front end's tokenizer loads while the engine starts
            tokenizer = pool.submit(load_tokenizer, source)
            self._engine = EngineProcess(model, self.args)
            try:
                self.tokenizer = tokenizer.result()
            except BaseException:
                self._engine.close()
                raise
        self.info = self._engine.info
        self._stats = self._engine.stats
        self.kv_events = None  # the prefix cache's changes, numbered, for routers (rtpjax.distributed.kv_events)
        if self.args.enable_kv_cache_events and self.args.enable_prefix_caching:
            from rtpjax.distributed.kv_events import KVEventLog

            try:
                self.kv_events = KVEventLog(endpoint=self.args.kv_events_endpoint,
                                            replay_endpoint=self.args.kv_events_replay_endpoint)  # fmt: skip
            except BaseException:
                self._engine.close()
                raise
        self._make_request = RequestMaker(self.tokenizer, self.info, self.args.seed)
        # request id -> (event loop, output queue or None once its reader left, accumulator). An entry lives until
        # the engine's last word on the request (finished output or error), so an id is never reused while the
        # engine may still send for it, and admission control counts what the engine still holds.
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue | None, Accumulator]] = {}
        self._lock = threading.Lock()  # the reader's lookup-and-pop against a leaving reader's hand-over
        self._reserved = 0
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._read, name="rtpjax-engine-reader", daemon=True)
        self._reader.start()

    async def submit(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                     priority: int = 0, kv_transfer_params: dict | None = None) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Validate and queue a request now (raising ValueError for bad input, RuntimeError when the engine is
        gone); returns its output stream. `kv_transfer_params`: vLLM's prefill/decode hand-off fields
        (rtpjax.disagg); the final output of a request handed to a decode engine carries the ones to pass on."""
        if self._stopped.is_set():
            raise RuntimeError("the engine is shut down")
        # Tokenizing and validating happen off the event loop; bad input raises here, for this request only.
        self._reserved += 1  # counted as unfinished from the first moment, so admission control sees it
        try:
            request = await asyncio.to_thread(self._make_request.message, prompt, sampling_params, request_id,
                                              priority)  # fmt: skip
        finally:
            self._reserved -= 1
        if kv_transfer_params is not None:
            request.kv_transfer_params = transfer_params(kv_transfer_params, self.args.role)
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), stream, Accumulator.of(request))
        try:
            self._engine.send(request)
        except ProtocolError as e:  # e.g. a seed past 64 bits: this request fails alone, nothing was sent
            self._streams.pop(rid, None)
            raise ValueError(f"the request cannot be sent to the engine process: {e}") from None
        except OSError:
            self._streams.pop(rid, None)
            raise RuntimeError("the engine is shut down") from None
        return self._outputs(rid, stream)

    async def generate(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                       priority: int = 0, kv_transfer_params: dict | None = None) -> AsyncIterator[RequestOutput]:  # fmt: skip
        stream = await self.submit(prompt, sampling_params, request_id, priority, kv_transfer_params)
        async for out in stream:
            yield out

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (running, waiting or queued for the engine)."""
        return len(self._streams) + self._reserved

    @property
    def is_alive(self) -> bool:
        return not self._stopped.is_set()

    async def _outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                out, error = await stream.get(), None
                # A reader slower than the engine gets what piled up as one output, so it catches up instead of
                # falling further behind (and an SSE client gets one event, not one per step).
                while not isinstance(out, BaseException) and not out.finished and not stream.empty():
                    following = stream.get_nowait()
                    if isinstance(following, BaseException):
                        error = following
                        break
                    out = _merge(out, following)
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
                if error is not None:
                    raise error
        finally:
            self._leave(request_id)

    def _leave(self, request_id: str) -> None:
        """The reader is gone: if the engine still runs the request, stop it (frees its blocks) and drop what
        it still sends."""
        with self._lock:
            entry = self._streams.get(request_id)
            if entry is None or entry[1] is None:
                return  # the engine is done with it
            self._streams[request_id] = (entry[0], None, entry[2])
        self._abort_in_engine(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream (if anyone still reads it) ends with finish_reason abort."""
        self._abort_in_engine(request_id)

    def _abort_in_engine(self, request_id: str) -> None:
        if self.is_alive:
            try:
                self._engine.send(Abort(request_id))
            except OSError:
                pass  # the engine is gone; the reader fails what it held

    def stats(self) -> dict:
        """The engine's gauges as of its last step (LLMEngine.stats()'s keys)."""
        return msgspec.structs.asdict(self._stats)

    def shutdown(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._engine.close()
            self._fail_all("the engine is shut down")
            if self.kv_events is not None:
                self.kv_events.close()
        self._reader.join(timeout=30)

    def _read(self) -> None:
        """The reader thread: one StepOutputs per engine step, delivered with one wake-up per event loop."""
        try:
            while True:
                step = self._engine.recv(StepOutputs)
                self._stats = step.stats
                if step.kv_events and self.kv_events is not None:
                    self.kv_events.publish(step.kv_events)
                by_loop: dict = {}
                for delta in step.outputs:
                    self._route(by_loop, delta.request_id, delta, finished=delta.finished)
                for error in step.errors:
                    self._route(by_loop, error.request_id, error.exception(), finished=True)
                for loop, items in by_loop.items():
                    try:
                        loop.call_soon_threadsafe(_put_all, items)
                    except RuntimeError:
                        pass  # that caller's event loop is closed: nobody is left to read its streams
        except (EOFError, OSError):
            pass
        except Exception:  # a bug (or a message it cannot read) must not leave every stream hanging: fail them all
            log.exception("the engine output reader failed")
            self._engine.proc.kill()
        if not self._stopped.is_set():
            self._stopped.set()
            self._fail_all("the engine process exited")
            try:
                code = self._engine.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - only for the log line
                code = "unknown"
            log.error("the engine process exited with code %s; failed the requests in flight", code)

    def _route(self, by_loop: dict, request_id: str, item: RequestDelta | Exception, finished: bool) -> None:
        """One output or error to its stream; the engine's last word on a request ends its entry."""
        with self._lock:
            entry = self._streams.pop(request_id, None) if finished else self._streams.get(request_id)
        if entry is None or entry[1] is None:
            return  # its reader left (the engine was told to stop it)
        if not isinstance(item, BaseException):
            try:
                item = entry[2].output(item)
            except Exception as e:  # noqa: BLE001 - one request's broken output fails that request only
                log.exception("could not build the output of request %s", request_id)
                item = RuntimeError(f"engine output error: {type(e).__name__}: {e}")
                if not finished:
                    self._leave(request_id)
        by_loop.setdefault(entry[0], []).append((entry[1], item))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            entries = list(self._streams.values())
            self._streams.clear()
        for loop, stream, _ in entries:
            if stream is not None:
                try:
                    loop.call_soon_threadsafe(stream.put_nowait, RuntimeError(message))
                except RuntimeError:
                    pass  # that event loop is closed
