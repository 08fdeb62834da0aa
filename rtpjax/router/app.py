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


class Router:
    """The router's state (the policy, the prefix index, the replicas, the metrics) and its handlers. `tokenizer`: the
    replicas' (cache_aware hashes prompts with it; without one it routes by load)."""

    def __init__(self, urls: list[str], policy: str, tokenizer, balance_abs: int, balance_rel: float,
                 health_interval_s: float, health_timeout_s: float, events_interval_s: float):  # fmt: skip
        self.policy, self.health_timeout_s = policy, health_timeout_s
        self.index = PrefixIndex() if policy == "cache_aware" else None
        self.chooser = Policy(policy, self.index, balance_abs=balance_abs, balance_rel=balance_rel)
        self.hasher = PromptHasher(tokenizer)
        self.metrics = RouterMetrics()
        self.session = None  # the one aiohttp.ClientSession to the replicas, made in the server's event loop (lifespan)
        self.pool = WorkerPool(urls, None, self.index, health_interval_s, health_timeout_s, events_interval_s)
        self.turn = itertools.count()

    def block_size(self) -> int:
        return next((w.load["block_size"] for w in self.pool.healthy() if w.load.get("block_size")), 16)

    async def prompt(self, request: Request, body: bytes) -> Prompt:
        """The prompt's block hashes for the cache-aware policy (none for the others)."""
        if self.index is None:
            return Prompt()
        self.chooser.block_size = self.block_size()
        if len(body) <= INLINE_TOKENIZE_BYTES:  # a thread's hand-off would cost more than it saves
            return self.hasher.prompt(request.url.path, body, self.chooser.block_size)
        return await asyncio.to_thread(self.hasher.prompt, request.url.path, body, self.chooser.block_size)

    async def routed(self, request: Request):
        """A completion to the replica the policy picks; one that refuses the connection is marked out, the next
        tried."""
        began = time.perf_counter()
        body = await request.body()
        prompt, metrics, tried = await self.prompt(request, body), self.metrics, set()
        while True:
            workers = [w for w in self.pool.healthy() if w not in tried]
            if not workers:
                return error_response(503, "no replica is available", "no_replica")
            decision = self.chooser.choose(prompt, workers)
            w = decision.worker
            metrics.decisions.labels(self.policy, decision.reason).inc()
            done = w.begin(prompt.num_tokens - decision.cached_tokens)
            if self.index is not None and prompt.hashes:
                self.index.note_routed(w.url, prompt.hashes)
            metrics.routing.observe(time.perf_counter() - began)
            try:
                response = await forward(self.session, w, request.method, request.url.path, body, request.headers,
                                         on_done=done, on_stream_error=self.stream_failed)
            except Unreachable as e:
                self.pool.mark_down(w, f"connection refused ({e})")
                metrics.failures.labels(w.url).inc()
                tried.add(w)
                continue
            metrics.requests.labels(w.url).inc()
            metrics.prompt_tokens.labels(w.url).inc(prompt.num_tokens)
            metrics.predicted_hits.labels(w.url).inc(decision.cached_tokens)
            if response.status_code >= 500:
                metrics.failures.labels(w.url).inc()
            return response

    def stream_failed(self, w) -> None:
        self.metrics.failures.labels(w.url).inc()

    async def passed(self, request: Request):
        """Any other route, round the healthy replicas."""
        body = await request.body()
        for _ in range(len(self.pool.workers)):
            workers = self.pool.healthy()
            if not workers:
                break
            w = workers[next(self.turn) % len(workers)]
            try:
                return await forward(self.session, w, request.method, request.url.path, body, request.headers,
                                     w.begin(0))  # fmt: skip
            except Unreachable as e:
                self.pool.mark_down(w, f"connection refused ({e})")
        return error_response(503, "no replica is available", "no_replica")

    async def health(self, request: Request):
        return Response(status_code=200 if self.pool.healthy() else 503)

    async def prometheus(self, request: Request):
        return Response(self.metrics.render(self.pool.workers), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def workers(self, request: Request):
        return JSONResponse([{"url": w.url, "healthy": w.healthy, "inflight": w.inflight, "load": w.load,
                              "step_cost": {"a": w.cost.a, "b": w.cost.b, "calibrated": w.cost.calibrated}}
                             for w in self.pool.workers])  # fmt: skip

    async def expire_tentative(self):
        while True:
            await asyncio.sleep(self.index.tentative_s)
            self.index.expire()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.session = self.pool.session = new_session(self.health_timeout_s)
        self.pool.start()
        expiry = asyncio.create_task(self.expire_tentative()) if self.index is not None else None
        try:
            yield
        finally:
            if expiry is not None:
                expiry.cancel()
            await self.pool.stop()
            await self.session.close()


def build_router(urls: list[str], policy: str = "cache_aware", tokenizer=None, balance_abs: int = 8,
                 balance_rel: float = 1.5, health_interval_s: float = 0.5, health_timeout_s: float = 1.0,
                 events_interval_s: float = 0.1) -> Starlette:  # fmt: skip
    """The router's app (`Router`)."""
    r = Router(urls, policy, tokenizer, balance_abs, balance_rel, health_interval_s, health_timeout_s,
               events_interval_s)  # fmt: skip
    routes = [Route(p, r.routed, methods=["POST"]) for p in ROUTED]
    routes += [Route(p, r.passed, methods=["GET", "POST"]) for p in PASSED]
    routes += [Route("/health", r.health, methods=["GET"]), Route("/metrics", r.prometheus, methods=["GET"]),
               Route("/workers", r.workers, methods=["GET"])]  # fmt: skip
    app = Starlette(routes=routes, lifespan=r.lifespan)
    app.state.pool, app.state.metrics = r.pool, r.metrics
    return app
