"""The OpenAI-compatible HTTP API over AsyncLLM: the routes, the API key, and errors as OpenAI's error bodies.

The handlers live by what they do: generation (`generate`: completions and chat completions, streamed or not) and
the endpoints around it (`info`); each takes the server's `ServeContext` (`context`) and the request. A client that
goes away aborts its requests, which frees their KV blocks.
"""

from __future__ import annotations

import secrets

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rtpjax.serve import generate, info
from rtpjax.serve.context import ServeContext
from rtpjax.serve.protocol import APIError

PUBLIC = ("/health", "/version", "/metrics", "/openapi.json")
ROUTES = [  # path, handler, method
    ("/v1/completions", generate.completions, "POST"),
    ("/v1/chat/completions", generate.chat, "POST"),
    ("/v1/models", info.models, "GET"),
    ("/tokenize", info.tokenize, "POST"),
    ("/detokenize", info.detokenize, "POST"),
    ("/health", info.health, "GET"),
    ("/pd/status", info.pd_status, "GET"),
    ("/version", info.version, "GET"),
    ("/server_info", info.server_info, "GET"),
    ("/get_server_info", info.server_info, "GET"),
    ("/model_info", info.model_info, "GET"),
    ("/get_model_info", info.model_info, "GET"),
    ("/health_generate", info.health_generate, "GET"),
    ("/metrics", info.prometheus, "GET"),
    ("/load", info.load, "GET"),
    ("/kv_events", info.kv_events, "GET"),
    ("/openapi.json", info.schema, "GET"),
]


class BearerAuth:
    """Requires `Authorization: Bearer <api key>` everywhere but the public probes, compared in constant time (a
    comparison that stops at the first wrong byte tells an attacker, by its timing, how much of a guess was right)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC:
            if not secrets.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected):
                err = APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                               type="authentication_error", code="invalid_api_key")  # fmt: skip
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(llm, model_name: str, api_key: str | None = None, max_queue: int = 256,
              model_path: str | None = None) -> Starlette:  # fmt: skip
    """`max_queue`: requests allowed to wait beyond the engine's running capacity before 429s. `model_path`: the
    model folder, as SGLang's /server_info and /model_info report it (routers name and tokenize by it)."""
    ctx = ServeContext(llm, model_name, max_queue, model_path)

    def endpoint(handler):
        async def answer(request: Request):
            return await handler(ctx, request)

        return answer

    routes = [Route(path, endpoint(handler), methods=[method], name=handler.__name__)
              for path, handler, method in ROUTES]  # fmt: skip
    middleware = [Middleware(BearerAuth, api_key=api_key)] if api_key else []
    errors = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=errors)
    app.state.metrics = ctx.metrics
    return app


async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception):
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                        status_code=500)  # fmt: skip
