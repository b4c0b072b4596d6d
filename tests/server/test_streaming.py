"""AnswerProgressive and AnswerMany through real stubs on an in-process server with the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from qaserve.server import QAServer
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import error_reason, in_process_server, tiny_settings

LONG = " ".join(f"Line {i}: the river number {i} flows into lake {i % 7} near the town of Ålesund." for i in range(80))
SHORT = "France is a country in Western Europe. Its capital is Paris."
STREAM_BOUND = 8


@pytest.fixture(scope="module")
async def server(tiny_model_dir: Path) -> AsyncIterator[tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub]]:
    settings = tiny_settings(tiny_model_dir, stream_max_in_flight=STREAM_BOUND, max_batch_windows=4)
    async with (
        in_process_server(settings) as qa_server,
        grpc.aio.insecure_channel(f"127.0.0.1:{qa_server.port}") as channel,
    ):
        yield qa_server, pb_grpc.QuestionAnsweringServiceStub(channel)


def qa_server_target(qa_server: QAServer) -> str:
    return f"127.0.0.1:{qa_server.port}"


def request(context: str = LONG, **fields: Any) -> pb.AnswerRequest:
    return pb.AnswerRequest(question="Which lake does river 42 flow into?", context=context, top_k=5, **fields)


def without_timing(response: pb.AnswerResponse) -> pb.AnswerResponse:
    copy = pb.AnswerResponse()
    copy.CopyFrom(response)
    copy.ClearField("timing")
    copy.ClearField("request_id")
    return copy


async def test_progressive_partials_grow_and_final_equals_answer(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub],
) -> None:
    _, stub = server
    fields = {"max_seq_len": 64, "doc_stride": 16}
    messages = [m async for m in stub.AnswerProgressive(pb.AnswerProgressiveRequest(request=request(**fields)))]
    unary = await stub.Answer(request(**fields), timeout=30)

    *partials, final = messages
    assert final.WhichOneof("update") == "final"
    assert without_timing(final.final) == without_timing(unary)
    # One request id per call, on every message of the stream and in the final answer.
    assert {m.request_id for m in messages} == {final.final.request_id} != {unary.request_id}
    assert unary.windows > 10
    assert partials, "a long context must report progress before the final message"
    done = [p.partial.windows_done for p in partials]
    assert all(p.WhichOneof("update") == "partial" for p in partials)
    assert done == sorted(set(done))  # strictly increasing
    assert all(p.partial.windows_total == unary.windows for p in partials)
    assert done[-1] < unary.windows
    for p in partials:
        for a in p.partial.answers:
            assert a.answer == LONG[a.start : a.end]


async def test_progressive_one_window_sends_only_the_final(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub],
) -> None:
    _, stub = server
    messages = [m async for m in stub.AnswerProgressive(pb.AnswerProgressiveRequest(request=request(SHORT)))]
    assert [m.WhichOneof("update") for m in messages] == ["final"]
    assert messages[0].final.windows == 1


async def test_progressive_bad_input_fails_the_call(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub],
) -> None:
    _, stub = server
    call = stub.AnswerProgressive(pb.AnswerProgressiveRequest(request=request(" ")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_mid_stream_empties_the_queue(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub],
) -> None:
    qa_server, stub = server
    huge = LONG * 12  # hundreds of windows at max_seq_len 32
    call = stub.AnswerProgressive(pb.AnswerProgressiveRequest(request=request(huge, max_seq_len=32, doc_stride=4)))
    first = await call.read()
    assert first.WhichOneof("update") == "partial"
    batcher = qa_server.engine.registry.loaded("tiny").batcher  # type: ignore[union-attr]
    assert batcher.queued_windows > 0
    call.cancel()
    for _ in range(100):
        if batcher.queued_windows == 0 and qa_server.engine.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert batcher.queued_windows == 0
    assert qa_server.engine.in_flight == 0
    reply = await stub.Answer(request(SHORT), timeout=10)  # still serving
    assert reply.answers


async def test_answer_many_answers_every_item_with_its_id(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub],
) -> None:
    qa_server, stub = server
    contexts = [SHORT, LONG[:600], LONG[:1500]]
    items = [
        pb.AnswerManyRequest(id=f"q{i}", request=pb.AnswerRequest(question=f"What is {i}?", context=contexts[i % 3]))
        for i in range(200)
    ]
    windows_before = qa_server.metrics.registry.get_sample_value("qaserve_batch_windows_count", {"model": "tiny"})
    responses = [r async for r in stub.AnswerMany(iter(items), timeout=60)]
    assert sorted(r.id for r in responses) == sorted(i.id for i in items)
    by_id = {item.id: item for item in items}
    for r in responses:
        assert r.WhichOneof("result") == "response"
        context = by_id[r.id].request.context
        assert all(a.answer == context[a.start : a.end] for a in r.response.answers)
    batches = qa_server.metrics.registry.get_sample_value("qaserve_batch_windows_count", {"model": "tiny"})
    total_windows = sum(r.response.windows for r in responses)
    assert batches - (windows_before or 0) < total_windows  # items shared forward passes


async def test_answer_many_bad_item_gets_its_own_error(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub],
) -> None:
    _, stub = server
    items = [pb.AnswerManyRequest(id=str(i), request=request(SHORT)) for i in range(10)]
    items[4] = pb.AnswerManyRequest(id="bad", request=pb.AnswerRequest(question="", context=SHORT))
    items[7] = pb.AnswerManyRequest(id="unknown-model", request=request(SHORT, model="nope"))
    responses = {r.id: r async for r in stub.AnswerMany(iter(items), timeout=30)}
    assert len(responses) == 10
    bad = responses["bad"]
    assert bad.WhichOneof("result") == "error"
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    violations = error_details_pb2.BadRequest()
    assert any(d.Unpack(violations) for d in bad.error.details)
    assert [v.field for v in violations.field_violations] == ["question"]
    assert responses["unknown-model"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert sum(r.WhichOneof("result") == "response" for r in responses.values()) == 8


async def test_answer_many_flow_control_bounds_items_in_progress(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub], monkeypatch: pytest.MonkeyPatch
) -> None:
    qa_server, stub = server
    release = asyncio.Event()
    started = 0
    real_answer = qa_server.engine.answer

    async def held_answer(*args: Any, **kwargs: Any) -> Any:
        nonlocal started
        started += 1
        await release.wait()
        return await real_answer(*args, **kwargs)

    monkeypatch.setattr(qa_server.engine, "answer", held_answer)
    sent = 0

    def items() -> Any:
        nonlocal sent
        for i in range(500):
            sent += 1
            yield pb.AnswerManyRequest(id=str(i), request=request(SHORT))

    call = stub.AnswerMany(items(), timeout=60)
    await asyncio.sleep(0.5)
    assert started == STREAM_BOUND  # the server stopped reading at the bound
    release.set()
    count = 0
    async for _ in call:
        count += 1
    assert count == 500 == sent


async def test_answer_many_client_that_stops_reading_does_not_drain_the_stream(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub], monkeypatch: pytest.MonkeyPatch
) -> None:
    qa_server, stub = server
    answered = 0
    real_answer = qa_server.engine.answer

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal answered
        answered += 1
        return await real_answer(*args, **kwargs)

    monkeypatch.setattr(qa_server.engine, "answer", counted)
    big = pb.AnswerRequest(question="Which lake?", context=LONG[:3000], top_k=20)
    # HTTP/2 flow control with the default 64 KiB window (no BDP probing growing it while nothing is read).
    channel = grpc.aio.insecure_channel(qa_server_target(qa_server), options=[("grpc.http2.bdp_probe", 0)])
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    call = stub.AnswerMany(iter(pb.AnswerManyRequest(id=str(i), request=big) for i in range(20_000)), timeout=60)
    await call.read()  # one response, then the client stops reading
    previous = -1
    for _ in range(40):
        await asyncio.sleep(0.5)
        if answered == previous:
            break
        previous = answered
    assert answered == previous, "the server kept answering items nobody reads"
    # What stalled: the stream bound plus what fits the client's HTTP/2 window, not the 20,000 sent.
    assert answered < 200
    call.cancel()


async def test_answer_many_malformed_frame_reaches_a_client_still_sending(
    server: tuple[QAServer, pb_grpc.QuestionAnsweringServiceStub], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame that does not parse while the first item is in progress and the client is still writing the rest:
    the client reads MALFORMED_REQUEST, not the "Internal error from Core" of a write the ended call cut off."""
    qa_server, _ = server
    in_progress = asyncio.Event()

    async def never_done(*args: Any, **kwargs: Any) -> Any:
        in_progress.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(qa_server.engine, "answer", never_done)
    good = pb.AnswerManyRequest(id="good", request=request(SHORT)).SerializeToString()
    frames = [good, b"\xff\xff\xff", *[good] * 100]
    async with grpc.aio.insecure_channel(qa_server_target(qa_server)) as channel:
        call = channel.stream_stream("/qaserve.v1.QuestionAnsweringService/AnswerMany")(iter(frames), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in call:
                pass
    assert in_progress.is_set()
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert error_reason(failure.value) == "MALFORMED_REQUEST"
    assert failure.value.details() == "the request could not be parsed as the method's request message"
