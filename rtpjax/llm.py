"""The Python APIs: LLM (blocking, batch) and AsyncLLM (async iterators), both driving LLMEngine.step.

AsyncLLM runs the loop on one background thread, because a step blocks on the device; requests and aborts reach it
through a queue and outputs come back to each caller's asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Sequence as Seq

from rtpjax.engine import EngineArgs, LLMEngine, RequestOutput
from rtpjax.sampling_params import SamplingParams

log = logging.getLogger("rtpjax")


def _engine(model: str | None, engine_args: dict) -> LLMEngine:
    return LLMEngine(model, EngineArgs(**engine_args))


class LLM:
    """Offline generation: `LLM(path).generate(prompts, SamplingParams(...))` -> one RequestOutput per prompt.

    `path`: a Hugging Face folder, a .gguf file, or nothing for the embedded SmolLM2-135M-Instruct.
    """

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = _engine(model, engine_args)
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


class AsyncLLM:
    """Online generation: `async for out in llm.generate(prompt, params): ...` with incremental outputs."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = _engine(model, engine_args)
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._reserved = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rtpjax-engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                     priority: int = 0) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Validate and queue a request now (raising ValueError for bad input); returns its output stream."""
        if self._stopped.is_set():
            raise RuntimeError("the engine is shut down")
        # Tokenizing and validating happen off the event loop; bad input raises here, for this request only.
        self._reserved += 1  # counted as unfinished from the first moment, so admission control sees it
        try:
            request = await asyncio.to_thread(self.engine.make_request, prompt, sampling_params, request_id, priority)
        finally:
            self._reserved -= 1
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request))
        return self._outputs(request.request_id, stream)

    async def generate(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:  # fmt: skip
        stream = await self.submit(prompt, sampling_params, request_id, priority)
        async for out in stream:
            yield out

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (running, waiting or queued for the engine)."""
        return len(self._streams) + self._reserved

    async def _outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    self._streams.pop(request_id, None)
                    return
        finally:
            if self._streams.pop(request_id, None) is not None:  # the caller left early: free its blocks
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream (if anyone still reads it) ends with finish_reason abort."""
        self._commands.put(("abort", request_id))

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)

    def _deliver(self, out) -> None:
        self._deliver_all([out])

    def _deliver_all(self, outputs) -> None:
        """One wake-up per event loop per step, not one per request (each is a cross-thread write and a callback)."""
        by_loop: dict = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopped.is_set():
            try:
                command = self._commands.get(block=not engine.has_work(), timeout=None)
            except queue.Empty:
                command = None
            while command is not None:
                kind, arg = command
                if kind == "stop":
                    return
                if kind == "add":
                    try:
                        engine.add(arg)
                    except ValueError as e:
                        self._deliver_error(arg.request_id, e)
                elif kind == "abort":
                    out = engine.abort(arg)
                    if out is not None:
                        self._deliver(out)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if engine.has_work():
                try:
                    outputs = engine.step()
                except Exception as e:  # a bug must not kill the loop: fail what was in flight, keep serving
                    log.exception("engine step failed; aborting the requests in flight")
                    outputs = []
                    for request_id in list(engine.requests):
                        engine.abort(request_id)
                        self._deliver_error(request_id, RuntimeError(f"engine error: {type(e).__name__}: {e}"))
                    engine.reset_inflight()
                self._deliver_all(outputs)

    def _deliver_error(self, request_id: str, error: Exception) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, error)
