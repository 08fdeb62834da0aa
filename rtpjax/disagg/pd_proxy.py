"""The two-phase request of prefill/decode disaggregation, as vLLM's protocol runs it (and vllm-router drives it).

1. The prefill worker gets the client's body with max_tokens 1, no streaming and
   `kv_transfer_params: {"do_remote_decode": true, ...}`; it answers with its one token and `kv_transfer_params`.
2. The decode worker gets the client's body unchanged plus those `kv_transfer_params`, pulls the K/V, and answers the
   client (streaming or not) as a colocated server would.

`disaggregated()` runs that for one request and returns the Starlette response to give the client; `PDPool` picks the
pair (prefill by its queue, decode by its KV cache use, from each worker's `GET /pd/status`) and moves to another
prefill worker when one fails. A decode worker that dies mid-stream ends the stream with an error event; a client that
goes away closes the decode stream, which aborts the request there.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

STATUS_TTL_S = 0.25  # how long a worker's /pd/status answer is reused


def prefill_body(body: dict) -> dict:
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out.update(max_tokens=1, stream=False, kv_transfer_params={
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None,
        "remote_host": None, "remote_port": None,
    })  # fmt: skip
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def _error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                      "param": None, "code": status}}  # fmt: skip


class PrefillFailed(Exception):
    """No prefill worker could take the request; `status` and `body` are what the client gets."""

    def __init__(self, status: int, body: dict):
        super().__init__(body["error"]["message"])
        self.status, self.body = status, body


async def run_prefill(client: httpx.AsyncClient, prefill_urls: list[str], path: str, body: dict,
                      headers: dict | None = None) -> dict | None:  # fmt: skip
    """The prefill phase on the first worker of `prefill_urls` that answers (one that is down or fails with a 5xx
    passes the request to the next): its kv_transfer_params, or None if it handed nothing over. A 4xx (a bad
    request) is the client's answer: PrefillFailed carries it."""
    last = "no prefill worker given"
    for url in prefill_urls:
        try:
            r = await client.post(url + path, json=prefill_body(body), headers=headers)
        except httpx.HTTPError as e:
            last = f"prefill worker {url} is unreachable: {type(e).__name__}: {e}"
            continue
        if r.status_code >= 500:
            last = f"prefill worker {url} failed with {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code >= 400:
            raise PrefillFailed(r.status_code, r.json())
        return r.json().get("kv_transfer_params")
    raise PrefillFailed(502, _error(502, last))


async def disaggregated(client: httpx.AsyncClient, prefill_urls: list[str], decode_url: str, path: str, body: dict,
                        headers: dict | None = None) -> Response:  # fmt: skip
    """One client request (`path`: /v1/completions or /v1/chat/completions, `body`: its JSON) through a prefill
    worker (the first of `prefill_urls` that works) and `decode_url`; the response to send the client."""
    try:
        params = await run_prefill(client, prefill_urls, path, body, headers)
    except PrefillFailed as e:
        return JSONResponse(e.body, status_code=e.status)
    decode = dict(body, kv_transfer_params=params) if params is not None else dict(body)
    request = client.build_request("POST", decode_url + path, json=decode, headers=headers)
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as e:
        return JSONResponse(_error(502, f"decode worker {decode_url} is unreachable: {type(e).__name__}: {e}"),
                            status_code=502)  # fmt: skip
    if not body.get("stream"):
        try:
            content = await response.aread()
        except httpx.HTTPError as e:
            return JSONResponse(_error(502, f"decode worker {decode_url} failed mid-answer: {type(e).__name__}"),
                                status_code=502)  # fmt: skip
        finally:
            await response.aclose()
        return Response(content, status_code=response.status_code, media_type="application/json")

    async def relay():
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:  # the decode worker died mid-stream: say so, then end
            message = f"decode worker {decode_url} failed mid-stream: {type(e).__name__}"
            yield f"data: {json.dumps(_error(502, message))}\n\n".encode()
        finally:
            await response.aclose()  # a client that left closes the decode stream: the decode side aborts

    return StreamingResponse(relay(), status_code=response.status_code,
                             media_type=response.headers.get("content-type", "text/event-stream"))  # fmt: skip


class PDPool:
    """Prefill and decode workers, ranked per request from their /pd/status: prefill by requests running and waiting
    (the queue a new prompt waits behind), decode by KV cache use. A worker that does not answer ranks last."""

    def __init__(self, client: httpx.AsyncClient, prefill_urls: list[str], decode_urls: list[str]):
        if not prefill_urls or not decode_urls:
            raise ValueError("prefill/decode disaggregation needs at least one prefill and one decode URL")
        self.client, self.prefill, self.decode = client, list(prefill_urls), list(decode_urls)
        self._status: dict[str, tuple[float, dict | None]] = {}

    async def status(self, url: str) -> dict | None:
        """The worker's GET /pd/status (cached briefly), or None when it does not answer."""
        seen = self._status.get(url)
        if seen is not None and time.monotonic() - seen[0] < STATUS_TTL_S:
            return seen[1]
        try:
            r = await self.client.get(url + "/pd/status", timeout=2.0)
            status = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            status = None
        self._status[url] = (time.monotonic(), status)
        return status

    async def ranked(self) -> tuple[list[str], list[str]]:
        """(prefill URLs best first, decode URLs best first)."""
        urls = self.prefill + self.decode
        statuses = dict(zip(urls, await asyncio.gather(*(self.status(u) for u in urls))))

        def queue(u):
            s = statuses[u]
            return (s is None, s and s["num_running"] + s["num_waiting"])

        def usage(u):
            s = statuses[u]
            return (s is None, s and s["kv_cache_usage"])

        return sorted(self.prefill, key=queue), sorted(self.decode, key=usage)

    async def handle(self, path: str, body: dict, headers: dict | None = None) -> Response:
        prefill, decode = await self.ranked()
        return await disaggregated(self.client, prefill, decode[0], path, body, headers)
