"""One request to one replica, and its response back, untouched: status, headers and body bytes as the replica sent
them (SSE streams chunk by chunk). What the replica cannot answer becomes the router's own error, never a hang:

- it refuses the connection: `Unreachable` (nothing was sent, so the caller may try another replica);
- it fails or is marked out (WorkerPool) before answering: 502;
- it fails or is marked out mid-stream: the stream ends with an OpenAI-style error event and `data: [DONE]`.

A client that goes away cancels the relay, which closes the upstream response: the replica sees the disconnect and
aborts the request, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import anyio
import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from rtpjax.router.workers import Worker

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization", "host"}  # fmt: skip
WORKER_HEADER = "x-rtpjax-worker"  # which replica answered


class Unreachable(Exception):
    """The replica refused the connection; the request was not sent."""


class WorkerDown(Exception):
    pass


def error_body(status: int, message: str, code: str) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, code: str, worker: Worker | None = None) -> JSONResponse:
    headers = {WORKER_HEADER: worker.url} if worker is not None else None
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


async def _until_down(awaitable, worker: Worker):
    """`awaitable`'s result, or WorkerDown as soon as the worker is marked out."""
    down = worker.down
    if down.is_set():
        raise WorkerDown
    work = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(down.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        waiter.cancel()
    if not work.done():
        work.cancel()
        raise WorkerDown
    return work.result()


async def forward(client: httpx.AsyncClient, worker: Worker, method: str, path: str, body: bytes, headers,
                  on_done, on_stream_error=None) -> Response:  # fmt: skip
    """Send the request to `worker` and give back its response. `on_done()` runs once when the exchange is over
    (for a stream, when its relay ends); `on_stream_error(worker)` when a stream breaks."""
    sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
    request = client.build_request(method, worker.url + path, content=body, headers=sent, timeout=None)
    streaming = False
    try:
        try:
            upstream = await _until_down(client.send(request, stream=True), worker)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise Unreachable(str(e)) from None
        except (httpx.HTTPError, WorkerDown) as e:
            return error_response(502, f"replica {worker.url} failed before answering: {_why(e)}", "replica_failed",
                                  worker)  # fmt: skip
        back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        back[WORKER_HEADER] = worker.url
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            streaming = True
            return StreamingResponse(_relay(upstream, worker, on_done, on_stream_error),
                                     status_code=upstream.status_code, headers=back)  # fmt: skip
        try:
            content = await _until_down(upstream.aread(), worker)
        except (httpx.HTTPError, WorkerDown) as e:
            return error_response(502, f"replica {worker.url} failed mid-answer: {_why(e)}", "replica_failed", worker)
        finally:
            await upstream.aclose()
        return Response(content, status_code=upstream.status_code, headers=back)
    finally:
        if not streaming:
            on_done()


async def _relay(upstream: httpx.Response, worker: Worker, on_done, on_error) -> AsyncIterator[bytes]:
    chunks = upstream.aiter_raw()
    try:
        while True:
            try:
                chunk = await _until_down(chunks.__anext__(), worker)
            except StopAsyncIteration:
                return
            yield chunk
    except (httpx.HTTPError, WorkerDown) as e:
        if on_error is not None:
            on_error(worker)
        message = f"replica {worker.url} failed mid-stream: {_why(e)}"
        yield f"data: {json.dumps(error_body(502, message, 'replica_failed'))}\n\ndata: [DONE]\n\n".encode()
    finally:
        with anyio.CancelScope(shield=True):  # a client that left cancels this relay: the close must still happen,
            await upstream.aclose()  # so that the replica sees the disconnect and aborts the request
        on_done()


def _why(e: Exception) -> str:
    if isinstance(e, WorkerDown):
        return "it stopped answering"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
