"""Prometheus metrics under vLLM's names with an `rtpjax:` prefix, so existing dashboards need one substitution."""

from __future__ import annotations

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)  # fmt: skip


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name, doc):
            return Histogram(f"rtpjax:{name}", doc, labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"rtpjax:{name}", doc, labels, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(f"rtpjax:{name}", doc, labels, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens")
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = hist("request_queue_time_seconds", "Time from arrival to first scheduling")
        self.running = gauge("num_requests_running", "Sequences running on the engine")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.preemptions = counter("num_preemptions", "Running sequences preempted for KV blocks")
        self.spec_drafts = counter("spec_decode_num_drafts", "Sequence-steps that verified speculative drafts")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed and verified")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.spec_per_pos = Counter("rtpjax:spec_decode_num_accepted_tokens_per_pos",
                                    "Draft tokens accepted, by position in the draft", ["model_name", "position"],
                                    registry=r)  # fmt: skip
        self._seen_totals: dict[int, int] = {}  # id(counter) -> total seen
        self.success = Counter("rtpjax:request_success", "Finished requests by finish reason",
                               ["model_name", "finished_reason"], registry=r)  # fmt: skip
        tier = ["model_name", "tier"]
        self.tier_counters = {
            key: Counter(f"rtpjax:kv_tier_{name}", doc, tier, registry=r) for key, name, doc in (
                ("queries", "queries", "Prompt tokens looked up in a KV tier below the device"),
                ("hits", "hits", "Prompt tokens loaded from a KV tier"),
                ("bytes_written", "written_bytes", "Bytes of KV blocks written down into a tier"),
                ("bytes_read", "read_bytes", "Bytes of KV blocks read out of a tier"),
                ("write_seconds", "write_seconds", "Time spent writing KV blocks into a tier"),
                ("read_seconds", "read_seconds", "Time spent reading KV blocks out of a tier (disk)"),
                ("errors", "errors", "Corrupt, truncated or missing KV blocks read, and failed writes (recomputed)"),
                ("dropped", "dropped_blocks", "KV blocks not written down"),
            )
        }  # fmt: skip
        self.tier_used = Gauge("rtpjax:kv_tier_usage_bytes", "Bytes of a KV tier in use", tier, registry=r)
        self.tier_capacity = Gauge("rtpjax:kv_tier_capacity_bytes", "Capacity of a KV tier", tier, registry=r)
        self.model_name = model_name
        self._seen_queries = self._seen_hits = 0
        self._seen_tiers: dict[tuple[str, str], float] = {}
        self.expert_tokens = Counter("rtpjax:moe_expert_tokens", "Tokens routed to each expert of each MoE layer "
                                     "(layer: the MoE layer's ordinal)", ["model_name", "layer", "expert"],
                                     registry=r)  # fmt: skip
        self._seen_expert_tokens: list[list[int]] = []

    def on_finished(self, out, metrics) -> None:
        """Record one finished request (its RequestOutput and the first sequence's RequestMetrics)."""
        if metrics.first_token is not None:
            self.ttft.observe(metrics.first_token - metrics.arrival)
        for gap in metrics.inter_token_latencies:
            self.itl.observe(gap)
        if metrics.finished is not None:
            self.e2e.observe(metrics.finished - metrics.arrival)
        if metrics.first_scheduled is not None:
            self.queue.observe(metrics.first_scheduled - metrics.arrival)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(sum(len(o.token_ids) for o in out.outputs))
        for o in out.outputs:
            self.success.labels(self.model_name, o.finish_reason or "unknown").inc()

    def render(self, stats: dict) -> bytes:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.prefix_queries.inc(stats["prefix_cache_queries"] - self._seen_queries)
        self.prefix_hits.inc(stats["prefix_cache_hits"] - self._seen_hits)
        self._seen_queries, self._seen_hits = stats["prefix_cache_queries"], stats["prefix_cache_hits"]
        for t in stats.get("kv_tiers", ()):
            t = t if isinstance(t, dict) else msgspec.structs.asdict(t)
            labels = (self.model_name, t["tier"])
            for key, counter in self.tier_counters.items():
                counter.labels(*labels).inc(t[key] - self._seen_tiers.get((t["tier"], key), 0))
                self._seen_tiers[t["tier"], key] = t[key]
            self.tier_used.labels(*labels).set(t["used_bytes"])
            self.tier_capacity.labels(*labels).set(t["capacity_bytes"])
        self._count_expert_tokens(stats.get("expert_load") or [])
        counts = [(self.preemptions, stats.get("num_preemptions", 0)),
                  (self.spec_drafts, stats.get("spec_decode_num_drafts", 0)),
                  (self.spec_draft_tokens, stats.get("spec_decode_num_draft_tokens", 0)),
                  (self.spec_accepted, stats.get("spec_decode_num_accepted_tokens", 0))]  # fmt: skip
        for pos, n in enumerate(stats.get("spec_decode_num_accepted_tokens_per_pos") or []):
            counts.append((self.spec_per_pos.labels(self.model_name, str(pos)), n))
        for metric, total in counts:  # the engine's totals since it started -> counter increments
            metric.inc(total - self._seen_totals.get(id(metric), 0))
            self._seen_totals[id(metric)] = total
        return generate_latest(self.registry)

    def _count_expert_tokens(self, load: list[list[int]]) -> None:
        seen = self._seen_expert_tokens or [[0] * len(row) for row in load]
        for layer, (row, before) in enumerate(zip(load, seen)):
            for expert, (n, m) in enumerate(zip(row, before)):
                if n > m:
                    self.expert_tokens.labels(self.model_name, str(layer), str(expert)).inc(n - m)
        self._seen_expert_tokens = load
