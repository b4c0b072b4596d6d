"""Contract edges a new client hits, through real gRPC calls: huge model names, inputs without tokens, doc_stride on
a one-window context, scores past 1 and host details in load failures."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from qaserve.server import QAServer
from qaserve_client.v1 import model_service_pb2 as mpb
from qaserve_client.v1 import model_service_pb2_grpc as mpb_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, in_process_server, tiny_settings

# Far past the 16 KiB of response headers a gRPC client accepts, were the server to repeat it.
HUGE_NAME = "m" * 40_000
MULTI_WINDOW = " ".join(f"Line {i}: the river number {i} flows into lake {i % 7} near Ålesund." for i in range(8))


@pytest.fixture(scope="module")
async def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> AsyncIterator[tuple[QAServer, grpc.aio.Channel]]:
    root = tmp_path_factory.mktemp("contract-models")
    (root / "broken").mkdir()
    shutil.copy(tiny_model_dir / "config.json", root / "broken" / "config.json")  # no weights, no tokenizer
    (root / "models.toml").write_text(
        f'default = "tiny"\n\n[[models]]\nname = "tiny"\nsource = "{tiny_model_dir}"\npinned = true\npreload = true\n'
        '\n[[models]]\nname = "spare"\nsource = "broken"\n'
    )
    settings = tiny_settings(tiny_model_dir, models_config=str(root / "models.toml"))
    async with (
        in_process_server(settings) as qa_server,
        grpc.aio.insecure_channel(f"127.0.0.1:{qa_server.port}") as channel,
    ):
        yield qa_server, channel


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status details on the error")


def violations(status: status_pb2.Status) -> list[str]:
    for packed in status.details:
        bad = error_details_pb2.BadRequest()
        if packed.Unpack(bad):
            return [v.field for v in bad.field_violations]
    return []


async def answer_error(channel: grpc.aio.Channel, **fields: Any) -> grpc.aio.AioRpcError:
    values: dict[str, Any] = {"question": SEED_QUESTION, "context": SEED_CONTEXT, **fields}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.QuestionAnsweringServiceStub(channel).Answer(pb.AnswerRequest(**values), timeout=30)
    return caught.value


async def model_call(channel: grpc.aio.Channel, method: str, name: str) -> grpc.aio.AioRpcError:
    stub = mpb_grpc.ModelServiceStub(channel)
    request = getattr(mpb, f"{method}Request")(name=name)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request, timeout=30)
    return caught.value


def assert_not_found_naming_the_configured_models(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    message = error.details() or ""
    assert len(message) < 300
    assert message.startswith("model 'mmmm")
    assert message.endswith("is not configured on this server; configured models: spare, tiny")
    assert rich_status(error).message == message


async def test_a_huge_model_name_gets_not_found_listing_the_configured_names(
    server: tuple[QAServer, grpc.aio.Channel],
) -> None:
    _, channel = server
    assert_not_found_naming_the_configured_models(await answer_error(channel, model=HUGE_NAME))


@pytest.mark.parametrize("method", ["GetModel", "LoadModel", "UnloadModel"])
async def test_model_service_answers_a_huge_name_with_not_found(
    server: tuple[QAServer, grpc.aio.Channel], method: str
) -> None:
    _, channel = server
    assert_not_found_naming_the_configured_models(await model_call(channel, method, HUGE_NAME))


async def test_answer_many_item_with_a_huge_name_gets_its_own_not_found(
    server: tuple[QAServer, grpc.aio.Channel],
) -> None:
    _, channel = server
    items = [
        pb.AnswerManyRequest(id="huge", request=pb.AnswerRequest(question="Q?", context=SEED_CONTEXT, model=HUGE_NAME)),
        pb.AnswerManyRequest(id="ok", request=pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT)),
    ]
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    responses = {r.id: r async for r in stub.AnswerMany(iter(items), timeout=30)}
    assert responses["huge"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert responses["huge"].error.message.endswith("configured models: spare, tiny")
    assert len(responses["huge"].error.message) < 300
    assert responses["ok"].response.answers


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"question": "\u00ad\u200b"}, "question"),  # soft hyphen, zero-width space
        ({"question": "\u200b \u2060\ufeff\u0007"}, "question"),  # zero-width, word joiner, BOM, a control
        ({"question": "\u0301\u0301"}, "question"),  # visible to Unicode, but no token for this tokenizer
        ({"context": "\u00ad\u200b"}, "context"),
        ({"context": "\u200c\u200d \u0000"}, "context"),
        ({"context": "\u0301"}, "context"),
    ],
)
async def test_text_without_tokens_is_invalid_argument_naming_the_field(
    server: tuple[QAServer, grpc.aio.Channel], fields: dict[str, str], field: str
) -> None:
    _, channel = server
    error = await answer_error(channel, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(rich_status(error)) == [field]


async def test_text_with_zero_width_characters_around_words_is_answered(
    server: tuple[QAServer, grpc.aio.Channel],
) -> None:
    _, channel = server
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    reply = await stub.Answer(
        pb.AnswerRequest(question="\u200bWhat is the capital?\u00ad", context=SEED_CONTEXT + "\u200b"), timeout=30
    )
    assert reply.answers


async def test_doc_stride_past_the_window_room_is_answered_when_the_context_fits_one_window(
    server: tuple[QAServer, grpc.aio.Channel],
) -> None:
    _, channel = server
    stub = pb_grpc.QuestionAnsweringServiceStub(channel)
    # 64 tokens: the question and special tokens leave about 50 for the context, which needs 13.
    reply = await stub.Answer(
        pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, max_seq_len=64, doc_stride=60), timeout=30
    )
    default = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=30)
    assert reply.windows == 1
    assert [(a.answer, a.start) for a in reply.answers] == [(a.answer, a.start) for a in default.answers]


async def test_doc_stride_past_the_window_room_is_invalid_when_the_context_needs_several_windows(
    server: tuple[QAServer, grpc.aio.Channel],
) -> None:
    _, channel = server
    error = await answer_error(channel, context=MULTI_WINDOW, max_seq_len=64, doc_stride=60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(rich_status(error)) == ["doc_stride"]


async def test_merged_scores_may_exceed_one(server: tuple[QAServer, grpc.aio.Channel]) -> None:
    _, channel = server
    # One word, over and over: every candidate span has the same text, and the pipeline (as qaserve) sums the
    # scores of an answer's occurrences, within a window and across windows.
    context = " ".join(["Paris"] * 200)
    request = pb.AnswerRequest(question="Capital?", context=context, max_seq_len=16, doc_stride=8, max_answer_len=1)
    reply = await pb_grpc.QuestionAnsweringServiceStub(channel).Answer(request, timeout=30)
    assert reply.windows > 1
    assert max(a.score for a in reply.answers) > 1.0
    assert all(a.score >= 0 for a in reply.answers)


async def test_load_failure_text_names_no_host_path(server: tuple[QAServer, grpc.aio.Channel]) -> None:
    _, channel = server
    error = await answer_error(channel, model="spare")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = (await mpb_grpc.ModelServiceStub(channel).GetModel(mpb.GetModelRequest(name="spare"), timeout=10)).model
    for text in (error.details() or "", rich_status(error).message, info.error):
        assert "failed to load" in text or info.error == text
        assert not re.search(r"(^|[\s'\"(=])(/|~/|[A-Za-z]:\\)", text), text
        assert "pytest" not in text and "tmp" not in text, text


async def test_answer_many_items_past_admission_get_their_own_resource_exhausted(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with in_process_server(tiny_settings(tiny_model_dir, max_in_flight=1)) as qa_server:
        registry = qa_server.engine.registry
        real_use = registry.use
        release = asyncio.Event()

        @contextlib.asynccontextmanager
        async def held_use(name: str) -> AsyncIterator[Any]:
            await release.wait()  # the first item keeps the one admission slot until the others are refused
            async with real_use(name) as serving:
                yield serving

        monkeypatch.setattr(registry, "use", held_use)
        items = [
            pb.AnswerManyRequest(id=str(i), request=pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT))
            for i in range(6)
        ]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{qa_server.port}") as channel:
                responses = {}
                async for response in pb_grpc.QuestionAnsweringServiceStub(channel).AnswerMany(iter(items), timeout=30):
                    responses[response.id] = response
                    if len(responses) == len(items) - 1:
                        release.set()
        finally:
            release.set()

    refused = [r for r in responses.values() if r.WhichOneof("result") == "error"]
    answered = [r for r in responses.values() if r.WhichOneof("result") == "response"]
    assert (len(refused), len(answered)) == (5, 1)
    for response in refused:
        assert response.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        reasons = [d for d in response.error.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        info = error_details_pb2.ErrorInfo()
        assert reasons and reasons[0].Unpack(info) and info.reason == "OVERLOADED"
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in response.error.details)
