"""`rtpjax router --pd-disaggregation --prefill URL ... --decode URL ...`: each OpenAI request runs its prompt on a
prefill worker, then continues on a decode worker that pulls the prompt's K/V (vLLM's kv_transfer_params protocol;
the two phases are rtpjax.disagg.pd_proxy's). Prefill workers are ranked by queue, decode workers by KV cache use,
from their GET /pd/status; a prefill worker that is down is skipped. A streaming client gets the prefill's token as
soon as the prefill answers (pd_proxy.disaggregated)."""

from __future__ import annotations

import contextlib

import aiohttp
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rtpjax.disagg.pd_proxy import CLIENT_ERRORS, PDPool
from rtpjax.router.app import PASSED, ROUTED
from rtpjax.router.proxy import error_response, new_session

FORWARDED_HEADERS = ("authorization",)
TEN_S = aiohttp.ClientTimeout(total=10.0)


def build_pd_router(prefill_urls: list[str], decode_urls: list[str], connect_timeout_s: float = 1.0) -> Starlette:
    state = {}  # the session and pool, made in the server's event loop (lifespan)

    def headers_of(request: Request) -> dict:
        return {k: v for k in FORWARDED_HEADERS if (v := request.headers.get(k)) is not None}

    async def routed(request: Request):
        try:
            body = msgspec.json.decode(await request.body())
        except msgspec.DecodeError:
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", "invalid_request_error")
        return await state["pool"].handle(request.url.path, body, headers_of(request))

    async def passed(request: Request):
        """Model list, tokenizer routes: from the first decode worker that answers."""
        _, decode = await state["pool"].ranked()
        ct = request.headers.get("content-type")
        headers = {**headers_of(request), **({"Content-Type": ct} if ct else {})}
        for url in decode:
            try:
                async with state["session"].request(request.method, url + request.url.path, data=await request.body(),
                                                     headers=headers, timeout=TEN_S) as r:  # fmt: skip
                    content = await r.read()
            except CLIENT_ERRORS:
                continue
            return Response(content, status_code=r.status, media_type=r.headers.get("content-type"))
        return error_response(503, "no decode worker is available", "no_replica")

    async def health(request: Request):
        pool = state["pool"]
        prefill, decode = await pool.ranked()
        up = [await pool.status(u, fresh=True) is not None for u in (prefill[0], decode[0])]
        return Response(status_code=200 if all(up) else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["session"] = new_session(connect_timeout_s)
        state["pool"] = PDPool(state["session"], prefill_urls, decode_urls)
        try:
            yield
        finally:
            await state["pool"].close()
            await state["session"].close()

    if not prefill_urls or not decode_urls:  # the same check as PDPool's, before the server starts
        raise ValueError("prefill/decode disaggregation needs at least one prefill and one decode URL")
    routes = [Route(p, routed, methods=["POST"]) for p in ROUTED]
    routes += [Route(p, passed, methods=["GET", "POST"]) for p in PASSED]
    routes += [Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)
