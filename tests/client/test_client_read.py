"""QAClient.read, AsyncQAClient.read and `qaserve-client read` against a real qaserve (the tiny model)."""

from __future__ import annotations

import asyncio
import json
import math
import typing

import grpc
import pytest

from qaserve_client import AsyncQAClient, Passage, QAClient, QAServeError, ReadOptions, ReadOptionsFields
from qaserve_client.cli import main
from qaserve_client.converters import result_from_read
from qaserve_client.options import READ_OPTION_NAMES, read_request
from qaserve_client.v1 import question_answering_pb2 as pb

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION

GERMANY = "Germany is a country in Central Europe. Its capital is Berlin."
# Not the seed question: other tests of the session's server expect that one's first answer not to be cached.
QUESTION = "Which city is the capital of France?"


def test_read_options_are_the_read_request_fields_but_question_and_passages() -> None:
    request_fields = {field.name for field in pb.ReadRequest.DESCRIPTOR.fields}
    assert set(READ_OPTION_NAMES) == request_fields - {"question", "passages"}
    assert typing.get_type_hints(ReadOptionsFields) == typing.get_type_hints(ReadOptions)


def test_a_read_request_sends_only_the_options_set() -> None:
    empty = read_request("Q?", ["a", Passage("b", "doc-b")], ReadOptions())
    assert [field.name for field, _ in empty.ListFields()] == ["question", "passages"]
    assert [(p.text, p.id) for p in empty.passages] == [("a", ""), ("b", "doc-b")]

    request = read_request("Q?", ["a"], ReadOptions(score_mode="pipeline", overlap_threshold=0.0, no_answer=True))
    assert request.score_mode == pb.SCORE_MODE_PIPELINE
    assert request.HasField("overlap_threshold") and request.overlap_threshold == 0.0
    assert not request.HasField("calibration_factor")


def test_a_read_request_refuses_a_lone_string_and_an_unknown_score_mode() -> None:
    with pytest.raises(TypeError, match="not one string"):
        read_request("Q?", "one passage", ReadOptions())
    with pytest.raises(ValueError, match="score_mode"):
        read_request("Q?", ["a"], ReadOptions(score_mode="softmax"))  # type: ignore[arg-type]


async def test_read_ranks_answers_across_passages(tiny_server: tuple[object, str]) -> None:
    async with AsyncQAClient(tiny_server[1], timeout=30) as client:
        result = await client.read(
            QUESTION,
            [Passage(SEED_CONTEXT, "france"), GERMANY],
            top_k=4,
            no_answer=True,
            metadata=[("x-request-id", "read-1")],
        )
        pipeline = await client.read(QUESTION, [SEED_CONTEXT, GERMANY], ReadOptions(score_mode="pipeline"))
        alone = await client.answer(QUESTION, SEED_CONTEXT)

    assert result.request_id == "read-1" and result.score_mode == "calibrated"
    assert len(result.answers) == 4 and result.windows == 2
    passages = [SEED_CONTEXT, GERMANY]
    for answer in result.answers:
        assert passages[answer.passage_index][answer.start : answer.end] == answer.answer
        assert answer.passage_id == ("france" if answer.passage_index == 0 else "")
    assert result.no_answer_score == pytest.approx(math.prod(1 - a.score for a in result.answers))
    assert json.loads(json.dumps(result.to_dict()))["answers"][0]["passage_index"] == result.answers[0].passage_index

    assert pipeline.score_mode == "pipeline" and pipeline.no_answer_score is None
    best = pipeline.answers[0]
    if best.passage_index == 0:  # the pipeline's answer for that passage, score and all
        assert (best.answer, best.score) == (alone.answers[0].answer, alone.answers[0].score)


async def test_a_bad_read_raises_naming_the_field(tiny_server: tuple[object, str]) -> None:
    def read_blank() -> None:
        with QAClient(tiny_server[1], timeout=30) as client:
            client.read(SEED_QUESTION, [SEED_CONTEXT, " "])

    with pytest.raises(QAServeError) as caught:
        await asyncio.to_thread(read_blank)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in caught.value.field_violations] == ["passages[1].text"]


async def test_the_read_command(tiny_server: tuple[object, str], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--target", tiny_server[1], "read", "--question", SEED_QUESTION, "--passage", SEED_CONTEXT]
    status = await asyncio.to_thread(main, [*args, "--passage", GERMANY, "--top-k", "3", "--no-answer", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert status == 0
    assert len(printed["answers"]) == 3 and printed["score_mode"] == "calibrated"
    assert printed["no_answer_score"] is not None

    status = await asyncio.to_thread(main, [*args, "--score-mode", "pipeline", "--no-answer"])
    table = capsys.readouterr().out.splitlines()
    assert status == 0
    assert table[0].split() == ["score", "passage", "span", "answer"]
    assert table[-1].startswith("no answer: ")

    status = await asyncio.to_thread(main, [*args, "--passage", "", "--json"])
    assert status == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert json.loads(capsys.readouterr().err)["error"]["field_violations"][0]["field"] == "passages[1].text"


def test_a_score_mode_this_client_does_not_know_comes_back_as_its_number() -> None:
    response = pb.ReadResponse(score_mode=pb.SCORE_MODE_PIPELINE)
    assert result_from_read(response).score_mode == "pipeline"
    response.score_mode = 7  # type: ignore[assignment]
    assert result_from_read(response).score_mode == "7"
