"""The router's HTTP server: the OpenAI routes go to the replica the policy picks, the rest to any healthy one.

`/v1/completions` and `/v1/chat/completions` are routed by policy (their bodies passed on as they came, so a malformed
request gets the replica's own 4xx); `/v1/models`, `/tokenize`, `/detokenize`, `/version` go round the healthy
replicas. The router answers `/health` (200 while a replica is in), `/metrics` and `/workers` (each replica's state)
itself. A replica that refuses the connection is marked out and the request goes to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rtpjax.router.index import PrefixIndex
from rtpjax.router.metrics import RouterMetrics
from rtpjax.router.policy import Policy, Prompt
from rtpjax.router.prompt import PromptHasher
from rtpjax.router.proxy import Unreachable, error_response, forward, new_session
from rtpjax.router.workers import WorkerPool

ROUTED = ("/v1/completions", "/v1/chat/completions")
PASSED = ("/v1/models", "/tokenize", "/detokenize", "/version")
INLINE_TOKENIZE_BYTES = 4096  # a request body up to this size is tokenized on the event loop, a longer one in a thread


def build_router(urls: list[str], policy: str = "cache_aware", tokenizer=None, balance_abs: int = 8,
                 balance_rel: float = 1.5, health_interval_s: float = 0.5, health_timeout_s: float = 1.0,
                 events_interval_s: float = 0.1) -> Starlette:  # fmt: skip
    """`tokenizer`: the replicas' (cache_aware hashes prompts with it; without one it routes by load)."""
    index = PrefixIndex() if policy == "cache_aware" else None
    chooser = Policy(policy, index, balance_abs=balance_abs, balance_rel=balance_rel)
    hasher = PromptHasher(tokenizer)
    metrics = RouterMetrics()
    session = None  # the one aiohttp.ClientSession to the replicas, made in the server's event loop (lifespan)
    pool = WorkerPool(urls, None, index, health_interval_s, health_timeout_s, events_interval_s)
    turn = itertools.count()

    def block_size() -> int:
        return next((w.load["block_size"] for w in pool.healthy() if w.load.get("block_size")), 16)

    async def routed(request: Request):
        began = time.perf_counter()
        body = await request.body()
        prompt = Prompt()
        if index is not None:
            chooser.block_size = block_size()
            if len(body) <= INLINE_TOKENIZE_BYTES:  # a thread's hand-off would cost more than it saves
                prompt = hasher.prompt(request.url.path, body, chooser.block_size)
            else:
                prompt = await asyncio.to_thread(hasher.prompt, request.url.path, body, chooser.block_size)
        tried: set = set()
        while True:
            workers = [w for w in pool.healthy() if w not in tried]
            if not workers:
                return error_response(503, "no replica is available", "no_replica")
            decision = chooser.choose(prompt, workers)
            w = decision.worker
            metrics.decisions.labels(policy, decision.reason).inc()
            done = w.begin(prompt.num_tokens - decision.cached_tokens)
            if index is not None and prompt.hashes:
                index.note_routed(w.url, prompt.hashes)
            metrics.routing.observe(time.perf_counter() - began)
            try:
                response = await forward(session, w, request.method, request.url.path, body, request.headers,
                                         on_done=done, on_stream_error=lambda w: metrics.failures.labels(w.url).inc())  # fmt: skip
            except Unreachable as e:
                pool.mark_down(w, f"connection refused ({e})")
                metrics.failures.labels(w.url).inc()
                tried.add(w)
                continue
            metrics.requests.labels(w.url).inc()
            metrics.prompt_tokens.labels(w.url).inc(prompt.num_tokens)
            metrics.predicted_hits.labels(w.url).inc(decision.cached_tokens)
            if response.status_code >= 500:
                metrics.failures.labels(w.url).inc()
            return response

    async def passed(request: Request):
        body = await request.body()
        for _ in range(len(pool.workers)):
            workers = pool.healthy()
            if not workers:
                break
            w = workers[next(turn) % len(workers)]
            try:
                return await forward(session, w, request.method, request.url.path, body, request.headers, w.begin(0))
            except Unreachable as e:
                pool.mark_down(w, f"connection refused ({e})")
        return error_response(503, "no replica is available", "no_replica")

    async def health(request: Request):
        return Response(status_code=200 if pool.healthy() else 503)

    async def prometheus(request: Request):
        return Response(metrics.render(pool.workers), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def workers(request: Request):
        return JSONResponse([{"url": w.url, "healthy": w.healthy, "inflight": w.inflight, "load": w.load,
                              "step_cost": {"a": w.cost.a, "b": w.cost.b, "calibrated": w.cost.calibrated}}
                             for w in pool.workers])  # fmt: skip

    async def expire_tentative():
        while True:
            await asyncio.sleep(index.tentative_s)
            index.expire()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal session
        session = pool.session = new_session(health_timeout_s)
        pool.start()
        expiry = asyncio.create_task(expire_tentative()) if index is not None else None
        try:
            yield
        finally:
            if expiry is not None:
                expiry.cancel()
            await pool.stop()
            await session.close()

    routes = [Route(p, routed, methods=["POST"]) for p in ROUTED]
    routes += [Route(p, passed, methods=["GET", "POST"]) for p in PASSED]
    routes += [Route("/health", health, methods=["GET"]), Route("/metrics", prometheus, methods=["GET"]),
               Route("/workers", workers, methods=["GET"])]  # fmt: skip
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.pool, app.state.metrics = pool, metrics
    return app
