"""OpenTelemetry tracing: off unless OTEL_* or --otlp-endpoint turns it on; a span per RPC, one per request stage."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from opentelemetry import trace

from qaserve.qa import QAResult, ReadResult

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)

# Span attributes of our own (no semantic convention covers them).
REQUEST_ID = "qaserve.request_id"
MODEL = "qaserve.model"
DEVICE = "qaserve.device"
WINDOWS = "qaserve.windows"
BATCH_WINDOWS = "qaserve.batch.windows"
BATCH_SIZES = "qaserve.batch.sizes"
FORWARD_PASSES = "qaserve.forward.passes"
EXPORTERS = ("otlp", "console", "none")
# OTLP transports: gRPC (a collector's port 4317) and protobuf over HTTP (4318, the OpenTelemetry spec's default).
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


class Tracing:
    """A tracer provider with the pieces the server uses: the RPC interceptor and the stage spans."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("qaserve", _version())

    def server_interceptor(self, untraced: Iterable[str]) -> grpc.aio.ServerInterceptor:
        """One SERVER span per RPC, continuing the caller's W3C `traceparent`; none for the `untraced` services."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_name

        traced = negate(any_of(*(service_name(name) for name in untraced)))
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            self.provider, filter_=traced
        )
        return interceptor

    def server_span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[object]:
        """One SERVER span for an HTTP call, continuing the W3C `traceparent` among its `headers`."""
        from opentelemetry.propagate import extract

        return self.tracer.start_as_current_span(name, context=extract(headers), kind=trace.SpanKind.SERVER)

    def record_stages(self, result: QAResult | ReadResult, batch_sizes: Sequence[int]) -> None:
        """Child spans of the current (RPC) span for the stages of a request that just finished decoding.

        The engine measures each stage; the spans are laid end to end back from now with those durations (the
        stages run back to back). With several forward passes (a long context) queue and forward are the summed
        waiting and computing time, and qaserve.batch.sizes lists the windows of each pass.
        """
        parent = trace.get_current_span()
        if not parent.is_recording():
            return
        timing, model = result.timing, result.model
        common: dict[str, AttributeValue] = {MODEL: model.name}
        stages: tuple[tuple[str, float, dict[str, AttributeValue]], ...] = (
            ("tokenize", timing.tokenize, {**common, WINDOWS: result.windows}),
            ("queue", timing.queue, common),
            (
                "forward",
                timing.forward,
                {
                    **common,
                    DEVICE: model.device,
                    BATCH_WINDOWS: max(batch_sizes, default=0),
                    BATCH_SIZES: list(batch_sizes),
                    FORWARD_PASSES: len(batch_sizes),
                },
            ),
            ("decode", timing.decode, common),
        )
        end = time.time_ns()
        start = end - sum(_ns(seconds) for _, seconds, _ in stages)
        for name, seconds, attributes in stages:
            span = self.tracer.start_span(name, start_time=start, attributes=attributes)
            start += _ns(seconds)
            span.end(end_time=start)

    def shutdown(self) -> None:
        """Exports what is still buffered and stops the exporters."""
        self.provider.shutdown()


def tag_request(request_id: str) -> None:
    """Puts the request id on the current RPC span, if one is being recorded (a no-op when tracing is off)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(REQUEST_ID, request_id)


def tracing_from_environment(otlp_endpoint: str = "", environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """Tracing as --otlp-endpoint and the standard OTEL_* variables ask for it; None (off) unless they do.

    On when OTEL_TRACES_EXPORTER names an exporter (otlp, console), or an OTLP endpoint is given
    (--otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). OTEL_SDK_DISABLED=true and
    OTEL_TRACES_EXPORTER=none keep it off. Everything else (headers, TLS, sampler, batching, resource attributes)
    follows the OTEL_* variables as the SDK reads them. A value it cannot use raises ValueError.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported {', '.join(unknown)} (allowed: {', '.join(EXPORTERS)})")
    endpoint_set = any(
        (otlp_endpoint, environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"), environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    )
    if not names:
        names = ["otlp"] if endpoint_set else []
    names = [n for n in names if n != "none"]
    if not names:
        return None
    protocol = _otlp_protocol(environ)
    return Tracing(_provider([_exporter(name, otlp_endpoint, protocol) for name in names]))


def _otlp_protocol(environ: Mapping[str, str]) -> str:
    """OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, else grpc (qaserve's default since
    before it spoke HTTP: a collector's port 4317)."""
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if value := environ.get(variable, "").strip().lower():
            if value not in OTLP_PROTOCOLS:
                raise ValueError(f"{variable}: unsupported {value!r} (allowed: {', '.join(OTLP_PROTOCOLS)})")
            return value
    return "grpc"


def _provider(exporters: Sequence[SpanExporter]) -> TracerProvider:
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Our name and version unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say otherwise.
    ours = Resource.create({"service.name": "qaserve", "service.version": _version()})
    provider = TracerProvider(resource=ours.merge(OTELResourceDetector().detect()))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter(name: str, otlp_endpoint: str, protocol: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # --otlp-endpoint is the collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is: traces go to /v1/traces.
        return HttpExporter(endpoint=f"{otlp_endpoint.rstrip('/')}/v1/traces" if otlp_endpoint else None)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=otlp_endpoint or None)


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _version() -> str:
    try:
        return importlib.metadata.version("qaserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
