"""Every Prometheus metric qaserve exports, registered on an injected registry."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
from collections.abc import Mapping

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from qaserve.errors import error_reasons

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
# Up to the default --max-context-chars (100 000) and beyond, for servers that raise it.
CONTEXT_CHAR_BUCKETS = (100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000)
REQUEST_WINDOW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512)
# The values of qaserve_model_state's `state` label (runtime.ModelState's values).
MODEL_STATES = ("unloaded", "loading", "ready", "failed")
# The values of qaserve_rejections_total's `reason` label (the batcher's).
REJECTION_REASONS = ("deadline",)
# Distributions whose versions qaserve_build_info reports, with each backend's framework (build_labels); "" when one
# is not installed (torch is an extra).
BUILD_DISTRIBUTIONS = {
    "version": "qaserve",
    "grpc": "grpcio",
    "protobuf": "protobuf",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
}


class Metrics:
    """The metric families; one instance per server, on the registry it is given (tests pass a fresh one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # No <counter>_created and <histogram>_created series: one more series per child that dashboards never
        # read (prometheus_client's switch is process-wide).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self._usage_devices: set[str] = set()  # devices whose usage gauges were set, so they can drop to 0
        self._register_runtime_collectors(registry)
        self.build_info = Info(
            "qaserve_build",
            "Always 1; the labels name the qaserve version and the versions of Python and the libraries it serves "
            'with ("" when one is not installed).',
            registry=registry,
        )
        self.build_info.info(build_labels())
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
            "Requests (and AnswerMany items) that ended in an error, by the ErrorInfo reason the client got; "
            "the one count of failures: overload is reason OVERLOADED here and nowhere else.",
            ["reason"],
            registry=registry,
        )
        self.rejections = Counter(
            "qaserve_rejections_total",
            "Requests the batcher dropped before a forward pass, by reason (deadline: it would pass first). They "
            "also end in qaserve_errors_total (DEADLINE_TOO_SHORT): this says where, not how many more.",
            ["reason"],
            registry=registry,
        )
        self.request_context_chars = Histogram(
            "qaserve_request_context_chars",
            "Context length of each request, in characters (code points), by model.",
            ["model"],
            buckets=CONTEXT_CHAR_BUCKETS,
            registry=registry,
        )
        self.request_windows = Histogram(
            "qaserve_request_windows",
            "Windows each request's context was split into (forward-pass inputs it costs), by model.",
            ["model"],
            buckets=REQUEST_WINDOW_BUCKETS,
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
        self.model_state = Gauge(
            "qaserve_model_state",
            "1 for each configured model's current state (unloaded, loading, ready, failed), 0 for the others.",
            ["model", "state"],
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
        # Counters whose label values are known up front start at 0, so a rate or an alert over them reads 0 from
        # the first scrape rather than no data; the configured models' ones as each is added (add_model).
        for reason in error_reasons():
            self.errors.labels(reason)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)

    def set_model_state(self, model: str, state: str) -> None:
        """Marks `state` (one of MODEL_STATES) as the model's current one."""
        for name in MODEL_STATES:
            self.model_state.labels(model, name).set(1 if name == state else 0)

    def set_model_usage(self, by_device: Mapping[str, tuple[int, int]]) -> None:
        """qaserve_models_loaded and qaserve_model_bytes from (models, bytes) by device; devices left out drop to 0."""
        for device in {*by_device, *self._usage_devices}:
            count, nbytes = by_device.get(device, (0, 0))
            self.models_loaded.labels(device).set(count)
            self.model_bytes.labels(device).set(nbytes)
        self._usage_devices.update(by_device)

    def add_model(self, model: str) -> None:
        """Starts a configured model's counters (model and response cache hits, misses, evictions) at 0."""
        for counter in (
            self.model_cache_hits,
            self.model_cache_misses,
            self.model_cache_evictions,
            self.response_cache_hits,
            self.response_cache_misses,
            self.response_cache_evictions,
        ):
            counter.labels(model)

    def forget_model(self, model: str) -> None:
        """Drops a model's qaserve_model_state series (a model removed from the configuration)."""
        for name in MODEL_STATES:
            with contextlib.suppress(KeyError):
                self.model_state.remove(model, name)

    @staticmethod
    def _register_runtime_collectors(registry: CollectorRegistry) -> None:
        """process_* (memory, CPU, open fds, start time), python_gc_* and python_info on `registry`.

        The default registry has them already (prometheus_client registers them at import): re-registering
        there would fail on duplicate names.
        """
        if registry is REGISTRY:
            return
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)


def http_address(host: str) -> str:
    """A gRPC-style host ("[::]", "[::1]", "0.0.0.0", a name) as the /metrics HTTP listener's bind address."""
    return host.removeprefix("[").removesuffix("]")


def build_labels() -> dict[str, str]:
    """qaserve_build_info's labels: distribution versions from the installed metadata (no imports), the backends'
    frameworks labelled by distribution name."""
    from qaserve.runtime.backends import BACKENDS  # here: the runtime package imports this module

    frameworks = {entry.distribution: entry.distribution for entry in BACKENDS.values() if entry.distribution}
    labels = {"python": platform.python_version()}
    for label, distribution in {**BUILD_DISTRIBUTIONS, **frameworks}.items():
        try:
            labels[label] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            labels[label] = ""
    return labels
