"""The real grpc.aio server in-process on the tiny model, through real stubs: contract, errors, health, metrics."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qaserve.server import QAServer
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

SERVICE = "qaserve.v1.QuestionAnsweringService"
CONTEXT = "France is a country in Western Europe. Its capital is Paris."


@pytest.fixture(scope="module")
async def channel(tiny_server: tuple[QAServer, str]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(tiny_server[1]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel) -> pb_grpc.QuestionAnsweringServiceStub:
    return pb_grpc.QuestionAnsweringServiceStub(channel)


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status details on the error")


def detail(status: status_pb2.Status, kind: Any) -> Any:
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    return None


async def test_answer_returns_spans_model_and_timing(stub: pb_grpc.QuestionAnsweringServiceStub) -> None:
    response = await stub.Answer(
        pb.AnswerRequest(question="What is the capital?", context=CONTEXT, top_k=3), timeout=10
    )
    assert 1 <= len(response.answers) <= 3
    for a in response.answers:
        assert a.answer == CONTEXT[a.start : a.end]
        assert (a.byte_start, a.byte_end) == (a.start, a.end)  # ASCII context
    assert response.model.name == "tiny"
    assert response.model.revision.startswith("sha256:")
    assert response.windows == 1
    assert response.timing.total_seconds >= response.timing.forward_seconds > 0


async def test_health_serving_overall_and_for_the_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in reflection.ServerReflectionInfo(iter([request]), timeout=5):
        names = {s.name for s in reply.list_services_response.service}
        break
    assert {SERVICE, "grpc.health.v1.Health"} <= names


BAD_INPUTS = [
    ({"question": "", "context": CONTEXT}, "question"),
    ({"question": " \t\n", "context": CONTEXT}, "question"),
    ({"question": "Why?", "context": ""}, "context"),
    ({"question": "Why?", "context": "   "}, "context"),
    ({"question": "Why?", "context": "x" * 100_001}, "context"),
    ({"question": "Why?", "context": CONTEXT, "top_k": 0}, "top_k"),
    ({"question": "Why?", "context": CONTEXT, "top_k": 21}, "top_k"),
    ({"question": "Why?", "context": CONTEXT, "top_k": -3}, "top_k"),
    ({"question": "Why?", "context": CONTEXT, "max_answer_len": 0}, "max_answer_len"),
    ({"question": "Why?", "context": CONTEXT, "max_seq_len": 64, "doc_stride": 100}, "doc_stride"),
    ({"question": "Why?", "context": CONTEXT, "doc_stride": -1}, "doc_stride"),
    ({"question": "Why?", "context": CONTEXT, "max_seq_len": 100_000}, "max_seq_len"),
    ({"question": "Why?", "context": CONTEXT, "max_question_len": 0}, "max_question_len"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_INPUTS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_INPUTS)])
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.QuestionAnsweringServiceStub, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Answer(pb.AnswerRequest(**fields), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rich_status(caught.value)
    bad_request = detail(status, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == [field]
    assert detail(status, error_details_pb2.ErrorInfo).reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize("model", ["nope", "../models/tiny", "/tmp", "distilbert-base-cased-distilled-squad"])
async def test_unknown_model_is_not_found(stub: pb_grpc.QuestionAnsweringServiceStub, model: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Answer(pb.AnswerRequest(question="Why?", context=CONTEXT, model=model), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert detail(rich_status(caught.value), error_details_pb2.ErrorInfo).reason == "MODEL_NOT_FOUND"


async def test_unexpected_errors_are_internal_without_their_text(
    tiny_server: tuple[QAServer, str],
    stub: pb_grpc.QuestionAnsweringServiceStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(tiny_server[0].engine, "answer", explode)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Answer(pb.AnswerRequest(question="Why?", context=CONTEXT), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")
    assert "secret internal detail" in caplog.text  # the traceback went to the log


async def test_metrics_endpoint_shows_requests(
    tiny_server: tuple[QAServer, str], stub: pb_grpc.QuestionAnsweringServiceStub
) -> None:
    server = tiny_server[0]
    before = server.metrics.registry.get_sample_value(
        "qaserve_request_duration_seconds_count", {"method": "Answer", "model": "tiny", "code": "OK"}
    )
    errors_before = server.metrics.registry.get_sample_value("qaserve_errors_total", {"reason": "INVALID_ARGUMENT"})
    await stub.Answer(pb.AnswerRequest(question="What is the capital?", context=CONTEXT), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Answer(pb.AnswerRequest(question="", context=CONTEXT), timeout=10)

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    def value(series: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " "))

    assert value('qaserve_request_duration_seconds_count{code="OK",method="Answer",model="tiny"}') == (before or 0) + 1
    assert 'qaserve_request_duration_seconds_count{code="INVALID_ARGUMENT",method="Answer",model="tiny"}' in text
    assert value('qaserve_errors_total{reason="INVALID_ARGUMENT"}') == (errors_before or 0) + 1
    assert "qaserve_requests_in_flight" in text
    assert "qaserve_forward_duration_seconds_bucket" in text


async def run_cli(*args: str) -> tuple[int, str, str]:
    cli = Path(sys.executable).with_name("qaserve-client")
    proc = await asyncio.create_subprocess_exec(
        str(cli), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_ask_json_and_health(tiny_server: tuple[QAServer, str]) -> None:
    target = tiny_server[1]
    code, out, err = await run_cli(
        "--target", target, "-H", "x-request-id:cli-1", "ask", "--question", "What is the capital?",
        "--context", CONTEXT, "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["request_id"] == "cli-1"
    best = result["answers"][0]
    assert {"answer", "score", "start", "end"} <= best.keys()
    assert best["answer"] == CONTEXT[best["start"] : best["end"]]
    assert result["model"]["name"] == "tiny"

    code, out, _ = await run_cli("--target", target, "health")
    assert code == 0
    assert "SERVING" in out

    code, _, err = await run_cli("--target", target, "ask", "--question", " ", "--context", CONTEXT)
    assert code == 64 + 3  # INVALID_ARGUMENT
    assert "INVALID_ARGUMENT" in err and "question" in err

    code, _, err = await run_cli("--target", target, "--json", "-H", "x-request-id:cli-2", "ask", "--question", "Q?",
                                 "--context", CONTEXT, "--model", "no-such-model")  # fmt: skip
    assert code == 64 + 5  # NOT_FOUND
    error = json.loads(err)["error"]
    assert (error["code"], error["reason"], error["request_id"]) == ("NOT_FOUND", "MODEL_NOT_FOUND", "cli-2")
