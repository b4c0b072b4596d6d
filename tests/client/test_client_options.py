"""AnswerOptions: one options type for answer, answer_progressive, ManyItem and the CLI, and the request it builds."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from qaserve_client import AnswerOptions, AnswerOptionsFields, AsyncQAClient, ManyItem, QAClient
from qaserve_client.converters import many_request
from qaserve_client.options import OPTION_NAMES, answer_request, options_of_request, resolve_options
from qaserve_client.v1 import question_answering_pb2 as pb

from fake_qaserve import FakeServer

CONTEXT = "Zürich liegt am See."


def test_options_are_the_answer_request_fields_but_question_and_context() -> None:
    request_fields = {field.name for field in pb.AnswerRequest.DESCRIPTOR.fields}

    assert set(OPTION_NAMES) == request_fields - {"question", "context"}
    # The keyword-argument TypedDict names the same fields with the same types.
    assert typing.get_type_hints(AnswerOptionsFields) == typing.get_type_hints(AnswerOptions)


def test_unset_options_stay_unset_and_set_ones_round_trip() -> None:
    empty = answer_request("Q?", "C", AnswerOptions())
    assert [field.name for field, _ in empty.ListFields()] == ["question", "context"]

    options = AnswerOptions(model="tiny", top_k=3, doc_stride=0, handle_impossible_answer=True, align_to_words=False)
    request = answer_request("Q?", "C", options)
    assert request.HasField("doc_stride") and request.doc_stride == 0
    assert request.HasField("align_to_words") and request.align_to_words is False
    assert not request.HasField("max_seq_len")
    assert options_of_request(request) == options


def test_keyword_arguments_override_the_options_object() -> None:
    base = AnswerOptions(top_k=2, model="tiny")

    assert resolve_options(base, {"top_k": 5}, AnswerOptions) == AnswerOptions(top_k=5, model="tiny")
    assert resolve_options(None, {}, AnswerOptions) == AnswerOptions()
    with pytest.raises(TypeError, match="topk"):
        resolve_options(base, {"topk": 5}, AnswerOptions)


def test_options_are_frozen_and_keyword_only() -> None:
    options = AnswerOptions(top_k=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        AnswerOptions("tiny")  # type: ignore[misc]


def test_many_item_is_an_answer_options_with_id_question_and_context() -> None:
    positional = ManyItem("a", "Q?", "C", top_k=2)
    built = ManyItem.of("a", "Q?", "C", AnswerOptions(top_k=2))

    assert positional == built
    assert isinstance(positional, AnswerOptions)
    request = many_request(positional)
    assert (request.id, request.request.question, request.request.top_k) == ("a", "Q?", 2)
    assert not request.request.HasField("align_to_words")


def test_answer_takes_an_options_object_and_keyword_overrides(server: FakeServer) -> None:
    options = AnswerOptions(model="tiny", top_k=2, max_answer_len=5)
    with QAClient(server.target) as client:
        client.answer("Where?", CONTEXT, options)
        client.answer("Where?", CONTEXT, options, top_k=1, align_to_words=False)
        client.answer("Where?", CONTEXT, top_k=3)
        updates = list(client.answer_progressive("Where?", CONTEXT, options, max_seq_len=64))
        with pytest.raises(TypeError, match="topk"):
            client.answer("Where?", CONTEXT, topk=3)  # type: ignore[call-arg]

    first, second, third, progressive = server.servicer.requests
    assert (first.model, first.top_k, first.max_answer_len) == ("tiny", 2, 5)
    assert (second.model, second.top_k, second.max_answer_len, second.align_to_words) == ("tiny", 1, 5, False)
    assert (third.model, third.top_k, third.HasField("max_answer_len")) == ("", 3, False)
    assert (progressive.top_k, progressive.max_seq_len) == (2, 64)
    assert len(updates) == 4


async def test_async_client_builds_the_same_requests(server: FakeServer) -> None:
    options = AnswerOptions(model="tiny", top_k=2, doc_stride=16)
    async with AsyncQAClient(server.target) as client:
        await client.answer("Where?", CONTEXT, options, top_k=1)
        [update async for update in client.answer_progressive("Where?", CONTEXT, options)]
        [result async for result in client.answer_many([ManyItem.of("a", "Where?", CONTEXT, options)])]

    with QAClient(server.target) as client:
        client.answer("Where?", CONTEXT, options, top_k=1)

    async_answer, async_progressive, async_many, sync_answer = server.servicer.requests
    assert async_answer == sync_answer == answer_request("Where?", CONTEXT, dataclasses.replace(options, top_k=1))
    assert async_progressive == async_many == answer_request("Where?", CONTEXT, options)
