"""The streaming calls against the fake server: answer_progressive and answer_many, sync and async."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from qaserve_client import (
    Answer,
    AnswerResult,
    AsyncQAClient,
    ManyItem,
    ManyResult,
    Progress,
    QAClient,
    QAServeError,
)
from qaserve_client.errors import error_from_status

from fake_qaserve import (
    NO_FINAL_QUESTION,
    OVERLOAD_QUESTION,
    PLAIN_ERROR_QUESTION,
    SLOW_QUESTION,
    FakeServer,
    invalid_question_error,
)

CONTEXT = "Zürich liegt am See."
ZURICH = Answer(answer="Zürich", score=0.9, start=0, end=6, byte_start=0, byte_end=7)


def test_answer_progressive_yields_partials_then_the_result(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        updates = list(
            client.answer_progressive("Where?", CONTEXT, top_k=2, model="tiny", metadata=[("x-request-id", "req-2")])
        )

    *partials, final = updates
    assert partials == [
        Progress(
            answers=(ZURICH, Answer(answer="liegt", score=0.45, start=7, end=12, byte_start=8, byte_end=13)),
            windows_done=done,
            windows_total=3,
            request_id="req-2",
        )
        for done in (1, 2, 3)
    ]
    assert isinstance(final, AnswerResult)
    assert (final.windows, final.request_id) == (3, "req-2")
    assert final.model.name == "tiny"
    (request,) = server.servicer.requests
    assert (request.top_k, request.model) == (2, "tiny")
    assert not request.HasField("align_to_words")


async def test_async_answer_progressive(server: FakeServer) -> None:
    async with AsyncQAClient(server.target) as client:
        updates = [update async for update in client.answer_progressive("Where?", CONTEXT)]

    assert [(u.windows_done, u.windows_total) for u in updates if isinstance(u, Progress)] == [(1, 3), (2, 3), (3, 3)]
    assert isinstance(updates[-1], AnswerResult)
    assert updates[-1].answers == (ZURICH,)


def test_answer_progressive_invalid_argument(server: FakeServer) -> None:
    with QAClient(server.target) as client, pytest.raises(QAServeError) as caught:
        list(client.answer_progressive(" ", CONTEXT))

    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field_violations == [("question", "must contain a non-whitespace character")]


def test_answer_progressive_error_after_progress(server: FakeServer) -> None:
    updates: list[Progress | AnswerResult] = []
    with QAClient(server.target) as client, pytest.raises(QAServeError) as caught:
        updates.extend(client.answer_progressive(PLAIN_ERROR_QUESTION, CONTEXT))

    assert [type(update) for update in updates] == [Progress]
    assert caught.value.code == grpc.StatusCode.INTERNAL


def test_answer_progressive_without_a_final_message_raises(server: FakeServer) -> None:
    with QAClient(server.target) as client, pytest.raises(QAServeError) as caught:
        list(client.answer_progressive(NO_FINAL_QUESTION, CONTEXT))

    assert caught.value.code == grpc.StatusCode.INTERNAL


async def test_async_answer_progressive_deadline_covers_the_whole_stream(server: FakeServer) -> None:
    updates: list[Progress | AnswerResult] = []
    async with AsyncQAClient(server.target, timeout=0.3) as client:
        with pytest.raises(QAServeError) as caught:
            async for update in client.answer_progressive(SLOW_QUESTION, CONTEXT):
                updates.append(update)

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(updates) == 1


def test_stream_deadline_defaults_to_the_client_timeout(server: FakeServer) -> None:
    with QAClient(server.target, timeout=30) as client:
        list(client.answer_progressive("Where?", CONTEXT))
        list(client.answer_progressive("Where?", CONTEXT, timeout=5))
        list(client.answer_progressive("Where?", CONTEXT, timeout=None))
        list(client.answer_many([ManyItem("a", "Where?", CONTEXT)]))
        list(client.answer_many([ManyItem("a", "Where?", CONTEXT)], timeout=None))

    default, explicit, none, many_default, many_none = server.servicer.stream_deadlines
    # The deadline reaches the server as a rounded timeout, so compare loosely.
    assert default is not None and 20 < default < 31
    assert explicit is not None and 1 < explicit < 6
    assert none is None
    assert many_default is not None and 20 < many_default < 31
    assert many_none is None


def test_closing_answer_progressive_early_cancels_the_call(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        updates = client.answer_progressive(SLOW_QUESTION, CONTEXT)
        first = next(updates)
        updates.close()

        assert isinstance(first, Progress)
        waited = 0.0
        while server.servicer.cancelled_streams == 0 and waited < 5:
            time.sleep(0.05)
            waited += 0.05
    assert server.servicer.cancelled_streams == 1


def test_answer_many_results_and_item_errors(server: FakeServer) -> None:
    items = [
        ManyItem("ok", "Where?", CONTEXT, top_k=2, model="tiny"),
        ManyItem("empty", "", CONTEXT),
        ManyItem("busy", OVERLOAD_QUESTION, CONTEXT),
        ManyItem("defaults", "Where?", CONTEXT),
    ]
    with QAClient(server.target) as client:
        results = {result.id: result for result in client.answer_many(items)}

    assert set(results) == {"ok", "empty", "busy", "defaults"}
    ok = results["ok"]
    assert ok.error is None and ok.result is not None
    assert [a.answer for a in ok.result.answers] == ["Zürich", "liegt"]
    assert ok.result.model.name == "tiny"

    empty = results["empty"]
    assert empty.result is None and empty.error is not None
    assert empty.error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert empty.error.message == "question: must contain a non-whitespace character"
    assert empty.error.reason == "INVALID_ARGUMENT"
    assert empty.error.field_violations == [("question", "must contain a non-whitespace character")]

    busy = results["busy"].error
    assert busy is not None
    assert (busy.code, busy.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
    assert busy.retry_after == pytest.approx(0.25)

    assert [r.top_k for r in server.servicer.requests if r.HasField("top_k")] == [2]
    assert sum(not r.HasField("top_k") for r in server.servicer.requests) == 3


def test_answer_many_sends_options_only_when_set(server: FakeServer) -> None:
    item = ManyItem(
        "all",
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
    with QAClient(server.target) as client:
        list(client.answer_many([item, ManyItem("none", "Where?", CONTEXT)]))

    full, bare = server.servicer.requests
    assert (full.top_k, full.max_answer_len, full.max_seq_len, full.doc_stride, full.max_question_len) == (
        3,
        7,
        128,
        0,
        32,
    )
    assert (full.model, full.handle_impossible_answer, full.align_to_words) == ("tiny", True, False)
    assert full.HasField("align_to_words") and full.HasField("doc_stride")
    assert not any(bare.HasField(name) for name in ("top_k", "doc_stride", "align_to_words"))


def test_answer_many_takes_a_lazy_iterable(server: FakeServer) -> None:
    def items() -> Iterator[ManyItem]:
        for n in range(5):
            yield ManyItem(str(n), "Where?", CONTEXT)

    with QAClient(server.target) as client:
        ids = sorted(result.id for result in client.answer_many(items()))

    assert ids == ["0", "1", "2", "3", "4"]


def test_answer_many_of_nothing(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        assert list(client.answer_many([])) == []


def test_answer_many_stream_error_raises(server: FakeServer) -> None:
    items = [ManyItem("a", "Where?", CONTEXT), ManyItem("b", PLAIN_ERROR_QUESTION, CONTEXT)]
    with QAClient(server.target) as client, pytest.raises(QAServeError) as caught:
        list(client.answer_many(items))

    assert (caught.value.code, caught.value.message) == (grpc.StatusCode.INTERNAL, "internal error")


def test_answer_many_unreachable(unused_target: str) -> None:
    with QAClient(unused_target) as client, pytest.raises(QAServeError) as caught:
        list(client.answer_many([ManyItem("a", "Where?", CONTEXT)]))

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason is None


def test_answer_many_raises_what_the_items_raise(server: FakeServer) -> None:
    def items() -> Iterator[ManyItem]:
        yield ManyItem("a", "Where?", CONTEXT)
        raise RuntimeError("items broke")

    with QAClient(server.target) as client, pytest.raises(RuntimeError, match="items broke"):
        list(client.answer_many(items()))


async def test_async_answer_many_with_an_async_iterable(server: FakeServer) -> None:
    async def items() -> AsyncIterator[ManyItem]:
        yield ManyItem("ok", "Where?", CONTEXT)
        yield ManyItem("empty", " ", CONTEXT)

    async with AsyncQAClient(server.target) as client:
        results = {result.id: result async for result in client.answer_many(items())}

    assert results["ok"].result is not None
    assert results["ok"].result.answers == (ZURICH,)
    assert results["empty"].error is not None
    assert results["empty"].error.field_violations == [("question", "must contain a non-whitespace character")]


async def test_async_answer_many_with_a_list(server: FakeServer) -> None:
    async with AsyncQAClient(server.target) as client:
        ids = sorted([r.id async for r in client.answer_many([ManyItem("x", "Q?", CONTEXT), ManyItem("y", "Q?", "a")])])

    assert ids == ["x", "y"]


async def test_async_answer_many_stream_errors(server: FakeServer, unused_target: str) -> None:
    async with AsyncQAClient(server.target, timeout=0.3) as client:
        with pytest.raises(QAServeError) as caught:
            [r async for r in client.answer_many([ManyItem("slow", SLOW_QUESTION, CONTEXT)])]
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    async with AsyncQAClient(unused_target) as client:
        with pytest.raises(QAServeError) as caught:
            [r async for r in client.answer_many([ManyItem("a", "Q?", CONTEXT)])]
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_async_answer_many_raises_what_the_items_raise(server: FakeServer) -> None:
    async def items() -> AsyncIterator[ManyItem]:
        yield ManyItem("a", "Where?", CONTEXT)
        raise RuntimeError("items broke")

    async with AsyncQAClient(server.target) as client:
        with pytest.raises(RuntimeError, match="items broke"):
            [r async for r in client.answer_many(items())]


def test_many_result_to_dict(server: FakeServer) -> None:
    with QAClient(server.target) as client:
        results = {r.id: r for r in client.answer_many([ManyItem("ok", "Q?", CONTEXT), ManyItem("bad", "", CONTEXT)])}

    ok = results["ok"].to_dict()
    assert ok["id"] == "ok"
    assert ok["answers"][0]["answer"] == "Zürich"
    assert set(ok) == {"id", "answers", "model", "timing", "windows", "request_id"}
    request_id = ok["request_id"]
    assert re.fullmatch("[0-9a-f]{32}", request_id)  # the server made it: the client sent none
    assert results["bad"].to_dict() == {
        "id": "bad",
        "error": invalid_question_error(request_id),
        "request_id": request_id,
    }


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def test_error_from_status_reads_every_detail() -> None:
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message="busy",
        details=[
            _packed(error_details_pb2.ErrorInfo(reason="OVERLOADED", domain="qaserve")),
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[error_details_pb2.BadRequest.FieldViolation(field="top_k", description="big")]
                )
            ),
            _packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))),
            _packed(error_details_pb2.DebugInfo(detail="ignored")),
        ],
    )

    error = error_from_status(status)

    assert (error.code, error.message, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "OVERLOADED")
    assert error.field_violations == [("top_k", "big")]
    assert error.retry_after == 2.0


@pytest.mark.parametrize("code", [code_pb2.OK, 999])
def test_error_from_status_with_a_code_that_is_no_error(code: int) -> None:
    assert error_from_status(status_pb2.Status(code=code, message="odd")).code == grpc.StatusCode.UNKNOWN


def test_many_result_holds_one_of_result_and_error() -> None:
    error = QAServeError(grpc.StatusCode.NOT_FOUND, "no such model", reason="MODEL_NOT_FOUND")
    assert ManyResult(id="x", result=None, error=error).to_dict()["error"]["reason"] == "MODEL_NOT_FOUND"
