"""Prometheus metrics (prometheus-client), on a registry of their own so several apps can live in one
process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)
from prometheus_client import disable_created_metrics

disable_created_metrics()  # no *_created series: they double the page and nobody graphs them

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                  0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram("hisa_time_to_first_token_seconds", "Time from arrival to the first generated token",
                              labels, buckets=_LATENCY, registry=r)
        self.itl = Histogram("hisa_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             labels, buckets=_TOKEN_LATENCY, registry=r)
        self.e2e = Histogram("hisa_e2e_request_latency_seconds", "Time from arrival to the end of a request",
                             labels, buckets=_LATENCY, registry=r)
        self.queue = Histogram("hisa_request_queue_time_seconds", "Time a request waited before running",
                               labels, buckets=_LATENCY, registry=r)
        self.prefill = Histogram("hisa_request_prefill_time_seconds", "Time spent computing prompt tokens",
                                 labels, buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("hisa_prompt_tokens", "Prompt tokens received", labels, registry=r)
        self.generation_tokens = Counter("hisa_generation_tokens", "Tokens generated", labels, registry=r)
        self.cached_tokens = Counter("hisa_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                     labels, registry=r)
        self.requests = Counter("hisa_request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.aborted = Counter("hisa_request_aborted", "Requests cancelled (client gone) or failed",
                               labels + ["reason"], registry=r)
        self.rejected = Counter("hisa_request_rejected", "Requests refused before running", labels + ["reason"],
                                registry=r)
        self.running = Gauge("hisa_num_requests_running", "Requests being computed", labels, registry=r)
        self.waiting = Gauge("hisa_num_requests_waiting", "Requests waiting in the queue", labels, registry=r)
        self.attended = Counter("hisa_attended_kv_tokens", "KV tokens attention actually read (summed over "
                                "layers and queries)", labels, registry=r)
        self.visible = Counter("hisa_visible_kv_tokens", "KV tokens causally visible to attention (summed over "
                               "layers and queries)", labels, registry=r)
        self.fraction = Gauge("hisa_attended_kv_fraction", "Fraction of visible KV tokens attended by the last "
                              "finished request", labels, registry=r)
        self.pooled_bytes = Gauge("hisa_pooled_index_bytes", "Bytes of HISA's pooled-key index (live + prefix cache)",
                                  labels, registry=r)
        self.kv_bytes = Gauge("hisa_kv_cache_bytes", "Bytes of K/V cache held by running requests", labels,
                              registry=r)
        self.prefix_bytes = Gauge("hisa_prefix_cache_bytes", "Bytes held by the prefix cache (K/V + pooled)",
                                  labels, registry=r)
        self.prefix_tokens = Gauge("hisa_prefix_cache_tokens", "Token capacity held by the prefix cache", labels,
                                   registry=r)
        self.max_model_len = Gauge("hisa_max_model_len", "Longest context accepted", labels, registry=r)
        self.gpu_allocated = Gauge("hisa_gpu_memory_allocated_bytes", "GPU memory held by tensors (model, caches, "
                                   "activations; CUDA only)", labels, registry=r)
        self.gpu_peak = Gauge("hisa_gpu_memory_peak_bytes", "Peak GPU memory held by tensors since start-up "
                              "(CUDA only)", labels, registry=r)
        self.name = model_name
        # zero-valued series exist from the start (dashboards and rate() see them before the first event)
        for reason in ("stop", "length"):
            self.requests.labels(model_name=model_name, finished_reason=reason)
        for reason in ("cancelled", "error"):
            self.aborted.labels(model_name=model_name, reason=reason)
        for reason in ("queue_full", "loading"):
            self.rejected.labels(model_name=model_name, reason=reason)
        for metric in (self.prompt_tokens, self.generation_tokens, self.cached_tokens, self.attended, self.visible,
                       self.running, self.waiting, self.fraction, self.pooled_bytes, self.kv_bytes,
                       self.prefix_bytes, self.prefix_tokens, self.max_model_len):
            metric.labels(model_name=model_name)

    def labels(self, metric, **extra):
        return metric.labels(model_name=self.name, **extra)

    def render(self) -> bytes:
        return generate_latest(self.registry)
