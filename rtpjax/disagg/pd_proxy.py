"""The two-phase request of prefill/decode disaggregation, as vLLM's protocol runs it (and vllm-router drives it).

1. The prefill worker gets the client's body with max_tokens 1, no streaming and
   `kv_transfer_params: {"do_remote_decode": true, ...}`; it answers with its one token and `kv_transfer_params`.
2. The decode worker gets the client's body unchanged plus those `kv_transfer_params`, pulls the K/V, and answers the
   client (streaming or not) as a colocated server would.

A streaming client of an rtpjax decode worker (its /pd/status says `stream_continuation`) gets the prefill's token as
soon as the prefill answers, in the chunks a colocated server sends, and then the decode worker's stream, which
continues that one (`rtpjax_continuation`: the same id and created, the tokens and text the client has left out), so
the hand-off delays the second token, not the first. Where that cannot apply (n > 1, echo, logprobs, nothing handed
over) the decode worker's answer is relayed whole.

`disaggregated()` runs that for one request and returns the Starlette response to give the client; `PDPool` picks the
pair (prefill by its queue, decode by its KV cache use, from each worker's `GET /pd/status`, refreshed off the
request's path) and moves to another prefill worker when one fails. A decode worker that dies mid-stream ends the
stream with an error event; a client that goes away closes the decode stream, which aborts the request there. Every
request goes out through one aiohttp session (rtpjax.router.proxy.new_session).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import msgspec
from starlette.responses import JSONResponse, Response, StreamingResponse

STATUS_TTL_S = 0.25  # a worker's /pd/status answer older than this is refreshed (in the background once known)
CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
JSON = {"Content-Type": "application/json"}


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


def _sse(payload) -> bytes:
    """One SSE event as serve/outputs.py writes it."""
    return f"data: {json.dumps(payload)}\n\n".encode()


class PrefillFailed(Exception):
    """No prefill worker could take the request; `status` and `body` are what the client gets."""

    def __init__(self, status: int, body: dict):
        super().__init__(body["error"]["message"])
        self.status, self.body = status, body


async def _post(session: aiohttp.ClientSession, url: str, body: dict, headers: dict | None):
    return await session.post(url, data=msgspec.json.encode(body), headers={**(headers or {}), **JSON})


async def prefill_answer(session: aiohttp.ClientSession, prefill_urls: list[str], path: str, body: dict,
                         headers: dict | None = None) -> dict:  # fmt: skip
    """The prefill phase on the first worker of `prefill_urls` that answers (one that is down or fails with a 5xx
    passes the request to the next): its JSON answer. A 4xx (a bad request) is the client's answer: PrefillFailed
    carries it."""
    last = "no prefill worker given"
    for url in prefill_urls:
        try:
            async with await _post(session, url + path, prefill_body(body), headers) as r:
                content = await r.read()
        except CLIENT_ERRORS as e:
            last = f"prefill worker {url} is unreachable: {type(e).__name__}: {e}"
            continue
        if r.status >= 500:
            last = f"prefill worker {url} failed with {r.status}: {content[:200].decode(errors='replace')}"
            continue
        try:
            answer = msgspec.json.decode(content)
        except msgspec.DecodeError:
            last = f"prefill worker {url} answered {r.status} with a body that is not JSON"
            continue
        if r.status >= 400:
            raise PrefillFailed(r.status, answer)
        return answer
    raise PrefillFailed(502, _error(502, last))


async def run_prefill(session: aiohttp.ClientSession, prefill_urls: list[str], path: str, body: dict,
                      headers: dict | None = None) -> dict | None:  # fmt: skip
    """The prefill phase's kv_transfer_params, or None if it handed nothing over."""
    return (await prefill_answer(session, prefill_urls, path, body, headers)).get("kv_transfer_params")


def continues(body: dict, answer: dict) -> bool:
    """Whether a request's stream can start with the prefill's token (the decode worker then continues the stream from
    the prefill's answer): one completion, no echo, no logprobs, a prefill that stopped only for its one-token limit
    and handed over that token (first_token_ids; without it the decode side would sample its own first token)."""
    logprobs, params = body.get("logprobs"), answer.get("kv_transfer_params") or {}
    return body.get("stream") is True and body.get("n", 1) in (1, None) and not body.get("echo") and \
        (logprobs is None or logprobs is False) and body.get("best_of") in (1, None) and \
        len(params.get("first_token_ids") or ()) == 1 and \
        answer["choices"][0].get("finish_reason") == "length"  # fmt: skip


def first_chunks(path: str, answer: dict) -> tuple[list[bytes], dict]:
    """The prefill's answer as the first chunks of a colocated server's stream, and the `rtpjax_continuation` that
    tells the decode worker what the client already has."""
    (choice,) = answer["choices"]
    head = {"id": answer["id"], "created": answer["created"], "model": answer["model"]}  # the prefill's own name
    if path.endswith("/chat/completions"):
        text = choice["message"]["content"] or ""
        chunk = dict(head, object="chat.completion.chunk")
        events = [dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}]),
                  dict(chunk, choices=[{"index": 0, "delta": {"content": text}, "logprobs": None,
                                        "finish_reason": None}])]  # fmt: skip
    else:
        text = choice["text"]
        events = [dict(head, object="text_completion",
                       choices=[{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])]  # fmt: skip
    tokens = answer.get("usage", {}).get("completion_tokens", 1)
    return [_sse(e) for e in events], {"id": answer["id"], "created": answer["created"], "text": text,
                                       "tokens": tokens}  # fmt: skip


async def disaggregated(session: aiohttp.ClientSession, prefill_urls: list[str], decode_url: str, path: str,
                        body: dict, headers: dict | None = None, continuation: bool = False) -> Response:  # fmt: skip
    """One client request (`path`: /v1/completions or /v1/chat/completions, `body`: its JSON) through a prefill
    worker (the first of `prefill_urls` that works) and `decode_url`; the response to send the client.
    `continuation`: the decode worker continues a stream from the prefill's answer (rtpjax's serve does)."""
    try:
        answer = await prefill_answer(session, prefill_urls, path, body, headers)
    except PrefillFailed as e:
        return JSONResponse(e.body, status_code=e.status)
    params = answer.get("kv_transfer_params")
    if params is not None and continuation and continues(body, answer):
        first, cont = first_chunks(path, answer)
        return StreamingResponse(_continued(session, first, decode_url + path,
                                            dict(body, kv_transfer_params=params, rtpjax_continuation=cont), headers),
                                 media_type="text/event-stream")  # fmt: skip
    decode = dict(body, kv_transfer_params=params) if params is not None else dict(body)
    try:
        response = await _post(session, decode_url + path, decode, headers)
    except CLIENT_ERRORS as e:
        return JSONResponse(_error(502, f"decode worker {decode_url} is unreachable: {type(e).__name__}: {e}"),
                            status_code=502)  # fmt: skip
    if response.content_type != "text/event-stream":
        try:
            content = await response.read()
        except CLIENT_ERRORS as e:
            return JSONResponse(_error(502, f"decode worker {decode_url} failed mid-answer: {type(e).__name__}"),
                                status_code=502)  # fmt: skip
        finally:
            response.release()
        return Response(content, status_code=response.status, media_type=response.content_type)
    return StreamingResponse(_relay(response, decode_url), status_code=response.status,
                             media_type="text/event-stream")  # fmt: skip


async def _relay(response: aiohttp.ClientResponse, decode_url: str):
    """The decode worker's stream, chunk by chunk; an error event if it breaks."""
    complete = False
    try:
        async for chunk in response.content.iter_any():
            yield chunk
        complete = True
    except CLIENT_ERRORS as e:  # the decode worker died mid-stream: say so, then end
        yield _sse(_error(502, f"decode worker {decode_url} failed mid-stream: {type(e).__name__}"))
    finally:
        if complete:
            response.release()
        else:
            response.close()  # a client that left closes the decode stream: the decode side aborts


async def _continued(session: aiohttp.ClientSession, first: list[bytes], url: str, body: dict, headers: dict | None):
    """The prefill's token at once, then the decode worker's continuation of the stream."""
    for chunk in first:
        yield chunk
    decode_url = url.rsplit("/v1/", 1)[0]
    try:
        response = await _post(session, url, body, headers)
    except CLIENT_ERRORS as e:
        yield _sse(_error(502, f"decode worker {decode_url} is unreachable: {type(e).__name__}: {e}"))
        return
    if response.status != 200 or response.content_type != "text/event-stream":
        try:
            content = (await response.read()).decode(errors="replace")
        except CLIENT_ERRORS:
            content = ""
        finally:
            response.release()
        try:
            message = json.loads(content)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = content[:200]
        yield _sse(_error(response.status if response.status >= 400 else 502,
                          f"decode worker {decode_url} failed with {response.status}: {message}"))  # fmt: skip
        return
    async for chunk in _relay(response, decode_url):
        yield chunk


class PDPool:
    """Prefill and decode workers, ranked per request from their /pd/status: prefill by requests running and waiting
    (the queue a new prompt waits behind), decode by KV cache use. A worker that does not answer ranks last. A
    request never waits for a status that is merely old: it ranks by the last one while a refresh runs beside it."""

    def __init__(self, session: aiohttp.ClientSession, prefill_urls: list[str], decode_urls: list[str]):
        if not prefill_urls or not decode_urls:
            raise ValueError("prefill/decode disaggregation needs at least one prefill and one decode URL")
        self.session, self.prefill, self.decode = session, list(prefill_urls), list(decode_urls)
        self._status: dict[str, tuple[float, dict | None]] = {}
        self._refreshing: dict[str, asyncio.Task] = {}

    async def _fetch(self, url: str) -> dict | None:
        try:
            async with self.session.get(url + "/pd/status", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                status = msgspec.json.decode(await r.read()) if r.status == 200 else None
        except (*CLIENT_ERRORS, msgspec.DecodeError):
            status = None
        self._status[url] = (time.monotonic(), status)
        return status

    async def status(self, url: str, fresh: bool = False) -> dict | None:
        """The worker's GET /pd/status, or None when it does not answer. A known one older than STATUS_TTL_S is
        returned as it is and refreshed in the background (`fresh`: waited for)."""
        seen = self._status.get(url)
        if seen is not None and time.monotonic() - seen[0] < STATUS_TTL_S:
            return seen[1]
        if seen is None or fresh:
            return await self._fetch(url)
        task = self._refreshing.get(url)
        if task is None or task.done():
            self._refreshing[url] = asyncio.create_task(self._fetch(url))
        return seen[1]

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
        cont = bool((self._status.get(decode[0], (0, None))[1] or {}).get("stream_continuation"))
        return await disaggregated(self.session, prefill, decode[0], path, body, headers, continuation=cont)

    async def close(self) -> None:
        for task in self._refreshing.values():
            task.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
