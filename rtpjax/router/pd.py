"""`rtpjax router --pd-disaggregation --prefill URL ... --decode URL ...`: each OpenAI request runs its prompt on a
prefill worker, then continues on a decode worker that pulls the prompt's K/V (vLLM's kv_transfer_params protocol;
the two phases are rtpjax.disagg.pd_proxy's). Prefill workers are ranked by queue, decode workers by KV cache use,
from their GET /pd/status; a prefill worker that is down is skipped."""

from __future__ import annotations

import contextlib
import json

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rtpjax.disagg.pd_proxy import PDPool
from rtpjax.router.app import PASSED, ROUTED
from rtpjax.router.proxy import error_response

FORWARDED_HEADERS = ("authorization",)


def build_pd_router(prefill_urls: list[str], decode_urls: list[str], connect_timeout_s: float = 1.0) -> Starlette:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=connect_timeout_s))
    pool = PDPool(client, prefill_urls, decode_urls)

    def headers_of(request: Request) -> dict:
        return {k: v for k in FORWARDED_HEADERS if (v := request.headers.get(k)) is not None}

    async def routed(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", "invalid_request_error")
        return await pool.handle(request.url.path, body, headers_of(request))

    async def passed(request: Request):
        """Model list, tokenizer routes: from the first decode worker that answers."""
        _, decode = await pool.ranked()
        for url in decode:
            try:
                r = await client.request(request.method, url + request.url.path, content=await request.body(),
                                         headers=headers_of(request), timeout=10.0)  # fmt: skip
            except httpx.HTTPError:
                continue
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        return error_response(503, "no decode worker is available", "no_replica")

    async def health(request: Request):
        prefill, decode = await pool.ranked()
        up = [await pool.status(u) is not None for u in (prefill[0], decode[0])]
        return Response(status_code=200 if all(up) else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await client.aclose()

    routes = [Route(p, routed, methods=["POST"]) for p in ROUTED]
    routes += [Route(p, passed, methods=["GET", "POST"]) for p in PASSED]
    routes += [Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)
