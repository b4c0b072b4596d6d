"""Tracing through real gRPC calls to an in-process server, spans exported in memory; and when tracing is on."""

from __future__ import annotations

import asyncio
import http.server
import importlib.metadata
import io
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from qaserve.logs import configure_logging
from qaserve.server import QAServer
from qaserve.tracing import Tracing, tracing_from_environment
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import (
    SEED_CONTEXT,
    SEED_QUESTION,
    free_port,
    http_request,
    in_process_server,
    start_qaserve,
    tiny_settings,
)

PATIENCE = 30.0
ANSWER = "/qaserve.v1.QuestionAnsweringService/Answer"
ANSWER_MANY = "/qaserve.v1.QuestionAnsweringService/AnswerMany"
STAGES = ["tokenize", "queue", "forward", "decode"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
async def traced_server(tiny_model_dir: Path, exporter: InMemorySpanExporter) -> AsyncIterator[QAServer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    async with in_process_server(
        tiny_settings(tiny_model_dir, response_cache_bytes=0, http_port=free_port()), tracing
    ) as server:
        yield server
    tracing.shutdown()


@pytest.fixture(scope="module")
async def channel(traced_server: QAServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server.port}") as ch:
        yield ch


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


async def rpc_span(exporter: InMemorySpanExporter, method: str) -> ReadableSpan:
    """The one SERVER span of `method` (it ends as the handler returns, just before the client has its answer)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PATIENCE
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == method and s.kind is SpanKind.SERVER]
        if found:
            assert len(found) == 1, [s.name for s in found]
            return found[0]
        assert loop.time() < give_up, f"no span for {method}"
        await asyncio.sleep(0.01)


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    kids = [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == parent.context.span_id]
    return sorted(kids, key=lambda s: (s.start_time or 0, STAGES.index(s.name)))


def check_stages(rpc: ReadableSpan, stages: Sequence[ReadableSpan]) -> None:
    """tokenize, queue, forward, decode: back to back, inside the RPC span, in the RPC's trace."""
    assert [s.name for s in stages] == STAGES
    assert rpc.context is not None and rpc.start_time is not None and rpc.end_time is not None
    for before, after in itertools.pairwise(stages):
        assert before.end_time == after.start_time
    for stage in stages:
        assert stage.context is not None and stage.start_time is not None and stage.end_time is not None
        assert stage.context.trace_id == rpc.context.trace_id
        assert rpc.start_time <= stage.start_time <= stage.end_time <= rpc.end_time
        assert stage.attributes is not None and stage.attributes["qaserve.model"] == "tiny"


async def test_answer_span_continues_the_callers_trace_with_four_stage_children(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    metadata = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"), ("x-request-id", "trace-me-1"))

    response = await stub.Answer(
        pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), metadata=metadata, timeout=PATIENCE
    )

    rpc = await rpc_span(spans, ANSWER)
    assert rpc.context is not None and rpc.parent is not None
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert format(rpc.parent.span_id, "016x") == CALLER_SPAN_ID
    assert rpc.parent.is_remote
    assert rpc.attributes is not None
    assert rpc.attributes["qaserve.request_id"] == "trace-me-1"
    assert rpc.attributes["rpc.method"] == "Answer"
    assert rpc.status.status_code is not StatusCode.ERROR

    stages = children(spans, rpc)
    check_stages(rpc, stages)
    forward = stages[2].attributes
    assert forward is not None
    assert forward["qaserve.batch.windows"] == response.windows == 1
    assert forward["qaserve.forward.passes"] == 1
    assert forward["qaserve.device"] == "cpu"
    assert stages[0].attributes is not None and stages[0].attributes["qaserve.windows"] == 1


async def test_json_log_lines_of_a_traced_request_carry_its_trace_and_span_ids(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("DEBUG", "json", stream)
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        metadata = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"), ("x-request-id", "logged-1"))
        await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), metadata=metadata)
        rpc = await rpc_span(spans, ANSWER)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (request_line,) = [line for line in lines if line.get("request_id") == "logged-1"]
    assert rpc.context is not None
    assert request_line["trace_id"] == TRACE_ID
    assert request_line["span_id"] == format(rpc.context.span_id, "016x")
    assert not [line for line in lines if "trace_id" in line and line.get("request_id") != "logged-1"]


async def test_http_call_span_continues_the_callers_trace_with_four_stage_children(
    traced_server: QAServer, spans: InMemorySpanExporter
) -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01", "X-Request-Id": "trace-me-http"}
    body = {"question": SEED_QUESTION, "context": SEED_CONTEXT}
    reply = await http_request(f"http://127.0.0.1:{traced_server.http_port}/v1/answer", body, headers=headers)
    assert reply.status == 200

    call = await rpc_span(spans, "POST /v1/answer")
    assert call.context is not None and call.parent is not None
    assert format(call.context.trace_id, "032x") == TRACE_ID
    assert format(call.parent.span_id, "016x") == CALLER_SPAN_ID
    assert call.attributes is not None and call.attributes["qaserve.request_id"] == "trace-me-http"
    check_stages(call, children(spans, call))


async def test_without_traceparent_the_rpc_span_starts_a_trace(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=PATIENCE)

    rpc = await rpc_span(spans, ANSWER)
    assert rpc.parent is None
    assert rpc.attributes is not None and len(str(rpc.attributes["qaserve.request_id"])) == 32  # generated
    check_stages(rpc, children(spans, rpc))


async def test_forward_span_carries_the_batch_size(channel: grpc.aio.Channel, spans: InMemorySpanExporter) -> None:
    """The windows of one request ride forward passes (on a CPU, spread over the replicas: runtime/policy.py): the
    forward span gives each pass's windows, the largest, and the count."""
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    context = " ".join(f"Sentence {i} says that river {i} flows north into the sea." for i in range(6))

    response = await stub.Answer(
        pb.AnswerRequest(question=SEED_QUESTION, context=context, max_seq_len=48, doc_stride=8), timeout=PATIENCE
    )

    rpc = await rpc_span(spans, ANSWER)
    forward = children(spans, rpc)[2]
    assert forward.attributes is not None
    sizes = list(forward.attributes["qaserve.batch.sizes"])  # type: ignore[arg-type]
    assert response.windows > 1
    assert sum(sizes) == response.windows  # alone on the server: every pass held only its windows
    assert forward.attributes["qaserve.batch.windows"] == max(sizes)
    assert forward.attributes["qaserve.forward.passes"] == len(sizes)


async def test_answer_many_items_are_stages_of_the_stream_span(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)

    async def requests() -> AsyncIterator[pb.AnswerManyRequest]:
        for i in range(2):
            yield pb.AnswerManyRequest(
                id=str(i), request=pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT)
            )

    replies = [reply async for reply in stub.AnswerMany(requests(), timeout=PATIENCE)]

    assert len(replies) == 2
    rpc = await rpc_span(spans, ANSWER_MANY)
    stages = children(spans, rpc)
    assert sorted(s.name for s in stages) == sorted(STAGES * 2)


async def test_status_code_is_on_the_rpc_span_and_server_faults_are_errors(
    traced_server: QAServer, channel: grpc.aio.Channel, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Answer(pb.AnswerRequest(question=" ", context=SEED_CONTEXT), timeout=PATIENCE)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    rpc = await rpc_span(spans, ANSWER)
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rpc.status.status_code is StatusCode.UNSET  # the caller's mistake, not the server's (semantic conventions)
    assert children(spans, rpc) == []  # refused before any stage ran

    async def explode(*args: object, **kwargs: object) -> object:
        raise RuntimeError("secret internal detail")

    spans.clear()
    monkeypatch.setattr(traced_server.engine, "answer", explode)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=PATIENCE)
    assert caught.value.code() == grpc.StatusCode.INTERNAL

    rpc = await rpc_span(spans, ANSWER)
    assert rpc.status.status_code is StatusCode.ERROR
    assert "secret" not in (rpc.status.description or "")


async def test_health_checks_are_not_traced(channel: grpc.aio.Channel, spans: InMemorySpanExporter) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    await health.Check(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=PATIENCE)

    await rpc_span(spans, ANSWER)  # the later call's span is there, the health check's is not
    assert not [s for s in spans.get_finished_spans() if "Health" in s.name]


# -- turning it on ------------------------------------------------------------------------------------------------


def provider_of(environ: dict[str, str], otlp_endpoint: str = "") -> Tracing | None:
    tracing = tracing_from_environment(otlp_endpoint, environ)
    if tracing is not None:
        tracing.shutdown()  # nothing was recorded: returns at once
    return tracing


@pytest.mark.parametrize(
    ("environ", "endpoint", "on"),
    [
        ({}, "", False),
        ({"OTEL_SERVICE_NAME": "qa"}, "", False),
        ({}, "http://collector:4317", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "", True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "", True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "", True),
        ({"OTEL_TRACES_EXPORTER": "console"}, "", True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "", False),
        ({"OTEL_SDK_DISABLED": "true"}, "http://collector:4317", False),
    ],
)
def test_tracing_is_off_unless_asked_for(environ: dict[str, str], endpoint: str, on: bool) -> None:
    assert (provider_of(environ, endpoint) is not None) is on


def test_service_name_is_qaserve_unless_otel_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    tracing = provider_of({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None
    attributes = tracing.provider.resource.attributes
    assert attributes["service.name"] == "qaserve"
    assert attributes["service.version"] == importlib.metadata.version("qaserve")
    assert attributes["deployment.environment"] == "test"

    monkeypatch.setenv("OTEL_SERVICE_NAME", "qa-eu")
    tracing = provider_of({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None and tracing.provider.resource.attributes["service.name"] == "qa-eu"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_unusable_otel_settings_are_named(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        tracing_from_environment("", environ)


def test_otlp_over_http_protobuf_posts_the_spans_to_the_collector_s_v1_traces() -> None:
    received: list[tuple[str, str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args: object) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
        tracing = tracing_from_environment(endpoint, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
        assert tracing is not None
        with tracing.tracer.start_as_current_span("probe"):
            pass
        tracing.shutdown()
    finally:
        collector.shutdown()
    (path, content_type, body), *_ = received
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    names = [span.name for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
    assert names == ["probe"]


async def test_serve_exits_2_naming_an_unusable_otel_variable(tiny_model_dir: Path) -> None:
    process = await start_qaserve(
        "serve",
        *("--model", str(tiny_model_dir), "--device", "cpu", "--port", "0", "--metrics-port", "0"),
        env={"OTEL_TRACES_EXPORTER": "zipkin"},
        drop=("QASERVE_", "OTEL_"),
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 2
    assert "OTEL_TRACES_EXPORTER" in err.decode()
    assert "Traceback" not in err.decode()
