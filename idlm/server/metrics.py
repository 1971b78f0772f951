"""Prometheus export (``GET /metrics``) with vLLM's metric names under the prefix ``idlm:``.

Engine counters and gauges are read from ``EngineMetrics`` at scrape time (a custom collector, so
they can never drift from the engine's own numbers); latencies and finished requests are observed
by the HTTP layer, which is where a request starts and ends."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)


class EngineCollector:
    def __init__(self, metrics_fn, model_name: str):
        self.metrics_fn, self.model_name = metrics_fn, model_name

    def collect(self):
        m = self.metrics_fn()
        lab = ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"idlm:{name}", doc, labels=lab)
            g.add_metric([self.model_name], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"idlm:{name}", doc, labels=lab)
            c.add_metric([self.model_name], value)
            return c

        if m is None:  # still loading: gauges at zero
            yield gauge("num_requests_running", "Requests holding KV blocks (prefilling or decoding).", 0)
            yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", 0)
            yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", 0)
            return
        yield gauge("num_requests_running", "Requests holding KV blocks (prefilling or decoding).", m.running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", m.waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", m.kv_usage)
        yield counter("prompt_tokens", "Prompt tokens prefilled.", m.prompt_tokens)
        yield counter("generation_tokens", "Output tokens committed.", m.generation_tokens)
        yield counter("num_preemptions", "Requests preempted (KV freed, recomputed later).", m.preemptions)
        yield counter("num_forwards", "Batched model forwards.", m.steps)
        yield counter("engine_busy_seconds", "Time the engine loop spent in steps (schedule, forward, commit).",
                      m.schedule_s + m.prepare_s + m.forward_s + m.postprocess_s)
        yield counter("spec_decode_num_drafts", "Verify steps (each checks one run of drafts).", m.verify_steps)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens verified.", sum(m.proposed_at))
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", sum(m.accepted_at))
        yield counter("spec_decode_num_tree_branches", "Draft-tree branches carried by verified windows (--tree).",
                      m.tree_branches)
        yield counter("spec_decode_num_tree_hits", "Steps whose next drafts came from a draft-tree branch.",
                      m.tree_hits)
        per = CounterMetricFamily("idlm:spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by draft position.", labels=lab + ["position"])
        for j, a in enumerate(m.accepted_at):
            per.add_metric([self.model_name, str(j)], a)
        yield per


class ServerMetrics:
    def __init__(self, model_name: str, metrics_fn):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(metrics_fn, model_name))
        lab, r, name = ["model_name"], self.registry, model_name
        self.success = Counter("idlm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("idlm:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=LATENCY_BUCKETS, registry=r).labels(name)
        self.itl = Histogram("idlm:inter_token_latency_seconds", "Time between output tokens.", lab,
                             buckets=LATENCY_BUCKETS, registry=r).labels(name)
        self.e2e = Histogram("idlm:e2e_request_latency_seconds", "Request latency, arrival to last token.", lab,
                             buckets=LATENCY_BUCKETS, registry=r).labels(name)
        self.disconnects = Counter("idlm:http_requests_client_disconnected", "Requests whose client went away.",
                                   lab, registry=r).labels(name)
        self.rejected = Counter("idlm:http_requests_rejected", "Requests refused because the queue was full.",
                                lab, registry=r).labels(name)
        self.model_name = name

    def finished(self, reason: str) -> None:
        self.success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
