"""Every Prometheus metric qaserve exports, registered on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
WINDOW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    """The metric families; one instance per server, on the registry it is given (tests pass a fresh one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_duration = Histogram(
            "qaserve_request_duration_seconds",
            "Time from receiving an RPC to sending its response, by method, model and status code.",
            ["method", "model", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "qaserve_requests_in_flight",
            "Requests being served now, by method.",
            ["method"],
            registry=registry,
        )
        self.errors = Counter(
            "qaserve_errors_total",
            "Requests that ended in an error, by reason.",
            ["reason"],
            registry=registry,
        )
        self.rejections = Counter(
            "qaserve_rejections_total",
            "Requests refused before any model work (overload, deadline, draining), by reason.",
            ["reason"],
            registry=registry,
        )
        self.queue_duration = Histogram(
            "qaserve_queue_duration_seconds",
            "Time a request's windows waited for a model replica, by model.",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.tokenize_duration = Histogram(
            "qaserve_tokenize_duration_seconds",
            "Time to split a request into windows, by model.",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.forward_duration = Histogram(
            "qaserve_forward_duration_seconds",
            "Time of one batched forward pass, by model and device.",
            ["model", "device"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.decode_duration = Histogram(
            "qaserve_decode_duration_seconds",
            "Time to turn a request's logits into answers, by model.",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.batch_windows = Histogram(
            "qaserve_batch_windows",
            "Windows per forward pass, by model.",
            ["model"],
            buckets=WINDOW_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "qaserve_batch_tokens",
            "Padded tokens (windows x longest window) per forward pass, by model.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.padding_ratio = Histogram(
            "qaserve_padding_ratio",
            "Share of a forward pass's tokens that are padding, by model.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=registry,
        )
        self.stream_items = Histogram(
            "qaserve_stream_items",
            "Messages sent on one streaming RPC, by method.",
            ["method"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
            registry=registry,
        )
        self.model_load_duration = Histogram(
            "qaserve_model_load_duration_seconds",
            "Time to load and warm up a model, by model.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
            registry=registry,
        )
        self.model_cache_hits = Counter(
            "qaserve_model_cache_hits_total", "Requests whose model was loaded, by model.", ["model"], registry=registry
        )
        self.model_cache_misses = Counter(
            "qaserve_model_cache_misses_total",
            "Requests whose model had to be loaded first, by model.",
            ["model"],
            registry=registry,
        )
        self.model_cache_evictions = Counter(
            "qaserve_model_cache_evictions_total",
            "Models evicted to make room for another, by model.",
            ["model"],
            registry=registry,
        )
        self.models_loaded = Gauge(
            "qaserve_models_loaded", "Models loaded now, by device.", ["device"], registry=registry
        )
        self.model_bytes = Gauge(
            "qaserve_model_bytes",
            "Parameter and buffer bytes of loaded models, by device.",
            ["device"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "qaserve_queue_depth_windows",
            "Windows waiting for a forward pass, by model.",
            ["model"],
            registry=registry,
        )
        self.response_cache_hits = Counter(
            "qaserve_response_cache_hits_total",
            "Requests answered from the response cache, by model.",
            ["model"],
            registry=registry,
        )
        self.response_cache_misses = Counter(
            "qaserve_response_cache_misses_total",
            "Requests the response cache did not hold, by model.",
            ["model"],
            registry=registry,
        )
        self.response_cache_evictions = Counter(
            "qaserve_response_cache_evictions_total",
            "Answers evicted from the response cache to make room, by model.",
            ["model"],
            registry=registry,
        )
        self.response_cache_bytes = Gauge(
            "qaserve_response_cache_bytes",
            "Estimated bytes held by the response cache.",
            registry=registry,
        )
