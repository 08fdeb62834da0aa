"""The router's Prometheus metrics (`rtpjax_router:` prefix): requests and routing decisions per replica, the cache
hits it predicted beside the hits the engines report, replica health, and its own routing time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class RouterMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        w = ["worker"]
        self.requests = Counter("rtpjax_router:requests", "Requests routed, by replica", w, registry=r)
        self.decisions = Counter("rtpjax_router:decisions", "Routing decisions by policy and reason",
                                 ["policy", "reason"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("rtpjax_router:prompt_tokens", "Prompt tokens routed (first prompt of each "
                                     "request), by replica", w, registry=r)  # fmt: skip
        self.predicted_hits = Counter("rtpjax_router:predicted_cache_hit_tokens", "Prompt tokens the router "
                                      "predicted cached on the replica it chose", w, registry=r)  # fmt: skip
        self.engine_queries = Gauge("rtpjax_router:engine_prefix_cache_queries", "The replica's own count of prompt "
                                    "tokens looked up in its prefix cache", w, registry=r)  # fmt: skip
        self.engine_hits = Gauge("rtpjax_router:engine_prefix_cache_hits", "The replica's own count of prompt "
                                 "tokens found in its prefix cache", w, registry=r)  # fmt: skip
        self.healthy = Gauge("rtpjax_router:worker_healthy", "1 while the replica is in", w, registry=r)
        self.failures = Counter("rtpjax_router:worker_failures", "Requests and streams a replica failed", w,
                                registry=r)  # fmt: skip
        self.routing = Histogram("rtpjax_router:routing_seconds", "Time from a request's arrival to sending it "
                                 "upstream (reading, tokenizing, choosing)", buckets=ROUTING_BUCKETS, registry=r)  # fmt: skip

    def render(self, workers) -> bytes:
        for w in workers:
            self.healthy.labels(w.url).set(1 if w.healthy else 0)
            self.engine_queries.labels(w.url).set(w.load.get("prefix_cache_queries", 0))
            self.engine_hits.labels(w.url).set(w.load.get("prefix_cache_hits", 0))
        return generate_latest(self.registry)
