"""QAClient and AsyncQAClient against the fake server: round trips, optional fields, errors, deadlines."""

from __future__ import annotations

import json
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2

from qaserve_client import (
    Answer,
    AnswerResult,
    AsyncQAClient,
    ManyItem,
    ModelRef,
    QAClient,
    QAServeError,
    ServerTiming,
)
from qaserve_client.converters import result_from_response
from qaserve_client.v1 import question_answering_pb2 as pb

from fake_qaserve import OVERLOAD_QUESTION, PLAIN_ERROR_QUESTION, SLOW_QUESTION, FakeServer

OPTIONAL_FIELDS = (
    "top_k",
    "max_answer_len",
    "max_seq_len",
    "doc_stride",
    "max_question_len",
    "align_to_words",
)
CONTEXT = "Zürich liegt am See."


def test_answer_round_trip(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        result = client.answer("Where?", CONTEXT, top_k=2, model="tiny", metadata=[("x-request-id", "req-1")])

    assert result == AnswerResult(
        answers=(
            Answer(answer="Zürich", score=0.9, start=0, end=6, byte_start=0, byte_end=7),
            Answer(answer="liegt", score=0.45, start=7, end=12, byte_start=8, byte_end=13),
        ),
        model=ModelRef(name="tiny", revision="sha256:00", device="cpu", dtype="float32"),
        timing=ServerTiming(
            total_seconds=0.5,
            tokenize_seconds=0.1,
            queue_seconds=0.1,
            forward_seconds=0.2,
            decode_seconds=0.1,
        ),
        windows=1,
        request_id="req-1",
    )


async def test_async_answer_round_trip(server: FakeServer) -> None:
    async with AsyncQAClient(server.target) as client:
        result = await client.answer("Where?", CONTEXT)

    assert result.answers == (Answer(answer="Zürich", score=0.9, start=0, end=6, byte_start=0, byte_end=7),)
    assert result.model.name == "fake"
    assert result.windows == 1


def test_to_dict_is_json_with_pipeline_keys(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        result = client.answer("Where?", CONTEXT)

    data = json.loads(json.dumps(result.to_dict()))
    assert data["answers"] == [{"answer": "Zürich", "score": 0.9, "start": 0, "end": 6, "byte_start": 0, "byte_end": 7}]
    assert data["model"] == {"name": "fake", "revision": "sha256:00", "device": "cpu", "dtype": "float32"}
    assert data["timing"]["total_seconds"] == 0.5
    assert data["windows"] == 1


def test_unset_options_are_not_sent(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        client.answer("Where?", CONTEXT)

    (request,) = server.servicer.requests
    assert [name for name in OPTIONAL_FIELDS if request.HasField(name)] == []
    assert request.model == ""
    assert request.handle_impossible_answer is False


def test_set_options_are_sent_even_when_zero_or_false(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        client.answer(
            "Where?",
            CONTEXT,
            model="tiny",
            top_k=3,
            max_answer_len=7,
            max_seq_len=128,
            doc_stride=0,
            max_question_len=32,
            handle_impossible_answer=True,
            align_to_words=False,
        )

    (request,) = server.servicer.requests
    assert all(request.HasField(name) for name in OPTIONAL_FIELDS)
    assert (request.top_k, request.max_answer_len, request.max_seq_len) == (3, 7, 128)
    assert (request.doc_stride, request.max_question_len) == (0, 32)
    assert request.align_to_words is False
    assert request.handle_impossible_answer is True
    assert request.model == "tiny"


def test_invalid_argument_carries_field_violations(server: FakeServer) -> None:
    with QAClient(server.target) as client, pytest.raises(QAServeError) as caught:
        client.answer(" ", CONTEXT)

    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "question: must contain a non-whitespace character"
    assert error.reason == "INVALID_ARGUMENT"
    assert error.field_violations == [("question", "must contain a non-whitespace character")]
    assert error.retry_after is None
    assert str(error) == "INVALID_ARGUMENT: question: must contain a non-whitespace character"


async def test_async_overload_carries_reason_and_retry_after(server: FakeServer) -> None:
    async with AsyncQAClient(server.target) as client:
        with pytest.raises(QAServeError) as caught:
            await client.answer(OVERLOAD_QUESTION, CONTEXT)

    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "OVERLOADED"
    assert error.retry_after == pytest.approx(0.25)
    assert error.field_violations == []


def test_error_without_details(server: FakeServer) -> None:
    with QAClient(server.target) as client, pytest.raises(QAServeError) as caught:
        client.answer(PLAIN_ERROR_QUESTION, CONTEXT)

    error = caught.value
    assert (error.code, error.message) == (grpc.StatusCode.INTERNAL, "internal error")
    assert (error.reason, error.field_violations, error.retry_after) == (None, [], None)


def test_client_timeout_is_the_default_deadline(server: FakeServer) -> None:
    with QAClient(server.target, timeout=0.2) as client, pytest.raises(QAServeError) as caught:
        client.answer(SLOW_QUESTION, CONTEXT)

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_call_timeout_overrides_the_default(server: FakeServer) -> None:
    with QAClient(server.target, timeout=60) as client, pytest.raises(QAServeError) as caught:
        client.answer(SLOW_QUESTION, CONTEXT, timeout=0.2)

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_async_client_timeout_is_the_default_deadline(server: FakeServer) -> None:
    async with AsyncQAClient(server.target, timeout=0.2) as client:
        with pytest.raises(QAServeError) as caught:
            await client.answer(SLOW_QUESTION, CONTEXT)

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health(server: FakeServer) -> None:
    server.set_health("qaserve.v1.QuestionAnsweringService", health_pb2.HealthCheckResponse.NOT_SERVING)
    with QAClient(server.target) as client:
        assert client.health() == "SERVING"
        assert client.health("qaserve.v1.QuestionAnsweringService") == "NOT_SERVING"
        with pytest.raises(QAServeError) as caught:
            client.health("no.such.Service")

    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_async_health(server: FakeServer) -> None:
    async with AsyncQAClient(server.target) as client:
        assert await client.health() == "SERVING"


def test_unreachable_server_is_unavailable(unused_target: str) -> None:
    with QAClient(unused_target) as client, pytest.raises(QAServeError) as caught:
        client.answer("Where?", CONTEXT)

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason is None


def test_close_leaves_a_borrowed_channel_open(server: FakeServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        with QAClient(channel=channel) as client:
            client.answer("Where?", CONTEXT)
        with QAClient(channel=channel) as client:
            assert client.answer("Where?", CONTEXT).answers[0].answer == "Zürich"


def test_request_id_round_trip_on_results_and_errors(server: FakeServer) -> None:
    with QAClient(server.target, metadata=[("x-request-id", "client-wide")]) as client:
        assert client.answer("Where?", CONTEXT).request_id == "client-wide"
        with pytest.raises(QAServeError) as caught:
            client.answer(" ", CONTEXT)
        assert caught.value.request_id == "client-wide"
    with QAClient(server.target) as client:
        made = client.answer("Where?", CONTEXT).request_id
        with pytest.raises(QAServeError) as caught:
            client.answer(PLAIN_ERROR_QUESTION, CONTEXT, metadata=[("x-request-id", "per-call")])

    assert re.fullmatch("[0-9a-f]{32}", made)
    assert (caught.value.code, caught.value.request_id) == (grpc.StatusCode.INTERNAL, "per-call")
    assert caught.value.to_dict()["request_id"] == "per-call"


async def test_async_request_id_on_errors_and_many_items(server: FakeServer) -> None:
    async with AsyncQAClient(server.target) as client:
        with pytest.raises(QAServeError) as caught:
            await client.answer(OVERLOAD_QUESTION, CONTEXT, metadata=[("x-request-id", "aio-1")])
        items = [ManyItem("ok", "Where?", CONTEXT), ManyItem("bad", " ", CONTEXT)]
        results = {r.id: r async for r in client.answer_many(items, metadata=[("x-request-id", "aio-2")])}

    assert (caught.value.reason, caught.value.request_id) == ("OVERLOADED", "aio-1")
    assert results["ok"].request_id == results["ok"].result.request_id == "aio-2"  # type: ignore[union-attr]
    assert results["bad"].request_id == results["bad"].error.request_id == "aio-2"  # type: ignore[union-attr]


def test_unreachable_server_gives_no_request_id(unused_target: str) -> None:
    with QAClient(unused_target, timeout=5) as client, pytest.raises(QAServeError) as caught:
        client.answer("Where?", CONTEXT)

    assert (caught.value.code, caught.value.request_id) == (grpc.StatusCode.UNAVAILABLE, None)


def test_cached_answers_are_marked() -> None:
    response = pb.AnswerResponse(timing=pb.ServerTiming(total_seconds=0.001, cached=True), request_id="r")

    result = result_from_response(response)

    assert (result.timing.cached, result.timing.forward_seconds, result.request_id) == (True, 0.0, "r")
    assert result.to_dict()["timing"]["cached"] is True
