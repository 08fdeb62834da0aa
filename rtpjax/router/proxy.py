"""One request to one replica, and its response back, untouched: status, headers and body bytes as the replica sent
them (SSE streams chunk by chunk, not decompressed). What the replica cannot answer becomes the router's own error,
never a hang:

- it refuses the connection: `Unreachable` (nothing was sent, so the caller may try another replica);
- it fails or is marked out (WorkerPool) before answering: 502;
- it fails or is marked out mid-stream: the stream ends with an OpenAI-style error event and `data: [DONE]`.

A client that goes away ends the relay, which closes the upstream connection: the replica sees the disconnect and
aborts the request, freeing its KV blocks.

Forwarding uses one aiohttp ClientSession (pooled keep-alive connections); a replica marked out reaches the
requests waiting on it through `Worker.watch` callbacks, so nothing per request or per chunk waits on a second task.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from starlette.responses import JSONResponse, Response

from rtpjax.router.workers import Worker

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization", "host"}  # fmt: skip
WORKER_HEADER = "x-rtpjax-worker"  # which replica answered
KEEPALIVE_S = 4.0  # below uvicorn's 5 s: the router drops an idle connection before a replica may close it


class Unreachable(Exception):
    """The replica refused the connection; the request was not sent."""


class WorkerDown(Exception):
    pass


class ClientGone(Exception):
    """The router's own client disconnected mid-stream."""


def new_session(connect_timeout_s: float) -> aiohttp.ClientSession:
    """The router's one client to its replicas: no cap on connections, no total timeout (a stream lasts as long as
    its generation), a bounded connect; bodies passed on as sent (no decompression, no Content-Type made up), no
    cookies kept."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(sock_connect=connect_timeout_s),
                                 auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                 skip_auto_headers=("Content-Type",))  # fmt: skip


def error_body(status: int, message: str, code: str) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, code: str, worker: Worker | None = None) -> JSONResponse:
    headers = {WORKER_HEADER: worker.url} if worker is not None else None
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


async def _until_down(awaitable, worker: Worker):
    """`awaitable`'s result, or WorkerDown as soon as the worker is marked out (this task is cancelled then)."""
    if not worker.healthy:
        raise WorkerDown
    task, fired = asyncio.current_task(), []

    def down() -> None:
        fired.append(True)
        task.cancel()

    worker.watch(down)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        if fired and task.uncancel() == 0:  # our own cancel, and no one else's: the worker went down
            raise WorkerDown from None
        raise
    finally:
        worker.unwatch(down)
    if fired:  # the answer came before the cancel could land: take it back
        task.uncancel()
    return result


def _fail_reads(content: aiohttp.StreamReader, error: Exception):
    """A callback that makes the next read of `content` raise `error`, unless the replica already sent all."""

    def fail() -> None:
        if not content.is_eof() and content.exception() is None:
            content.set_exception(error)

    return fail


async def forward(session: aiohttp.ClientSession, worker: Worker, method: str, path: str, body: bytes, headers,
                  on_done, on_stream_error=None) -> Response:  # fmt: skip
    """Send the request to `worker` and give back its response. `on_done()` runs once when the exchange is over
    (for a stream, when its relay ends); `on_stream_error(worker)` when a stream breaks."""
    sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
    streaming = False
    try:
        try:
            upstream = await _until_down(session.request(method, worker.url + path, data=body, headers=sent),
                                         worker)  # fmt: skip
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            raise Unreachable(str(e)) from None
        except (aiohttp.ClientError, WorkerDown) as e:
            return error_response(502, f"replica {worker.url} failed before answering: {_why(e)}", "replica_failed",
                                  worker)  # fmt: skip
        back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        back[WORKER_HEADER] = worker.url
        if upstream.content_type == "text/event-stream":
            streaming = True
            return Relay(upstream, worker, back, on_done, on_stream_error)
        down = _fail_reads(upstream.content, WorkerDown())
        worker.watch(down)
        try:
            content = await upstream.read()
        except (aiohttp.ClientError, WorkerDown) as e:
            return error_response(502, f"replica {worker.url} failed mid-answer: {_why(e)}", "replica_failed", worker)
        finally:
            worker.unwatch(down)
            upstream.release()
        return Response(content, status_code=upstream.status, headers=back)
    finally:
        if not streaming:
            on_done()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Relay(Response):
    """An SSE response passed on chunk by chunk as the replica sends it. It ends with the replica's stream; early,
    with an error event, when the replica fails or is marked out; at once, closing the upstream connection, when the
    client goes away."""

    def __init__(self, upstream: aiohttp.ClientResponse, worker: Worker, headers: dict, on_done, on_error):
        self.upstream, self.worker, self.on_done, self.on_error = upstream, worker, on_done, on_error
        self.status_code, self.background = upstream.status, None
        self.init_headers(headers)

    async def __call__(self, scope, receive, send) -> None:
        content, complete = self.upstream.content, False
        down = _fail_reads(content, WorkerDown())
        self.worker.watch(down)
        gone = asyncio.ensure_future(_disconnected(receive))
        gone.add_done_callback(self._client_gone)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            complete = await self._pass_on(content, send)
            if complete is not None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            self.worker.unwatch(down)
            if complete:
                self.upstream.release()  # read to its end: the connection goes back to the pool
            else:
                self.upstream.close()  # the replica sees the disconnect and aborts the request
            self.on_done()

    def _client_gone(self, listener: asyncio.Future) -> None:
        if not listener.cancelled():
            listener.exception()  # a listener that failed cannot hear the disconnect either: end as if it came
            _fail_reads(self.upstream.content, ClientGone())()

    async def _pass_on(self, content: aiohttp.StreamReader, send) -> bool | None:
        """The replica's chunks to the client: True when its stream ended, False when it failed (the client got an
        error event), None when the client went away."""
        while True:
            try:
                chunk = await content.readany()
            except ClientGone:
                return None
            except (aiohttp.ClientError, WorkerDown) as e:
                if self.on_error is not None:
                    self.on_error(self.worker)
                message = f"replica {self.worker.url} failed mid-stream: {_why(e)}"
                event = f"data: {json.dumps(error_body(502, message, 'replica_failed'))}\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                return False
            if not chunk:
                return True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


def _why(e: Exception) -> str:
    if isinstance(e, WorkerDown):
        return "it stopped answering"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
