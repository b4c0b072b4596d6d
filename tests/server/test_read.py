"""Read over real gRPC: answers across passages in both score modes, the cache, and bad input naming its field."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from qaserve.server import QAServer
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, http_request

PASSAGES = [
    pb.Passage(text=SEED_CONTEXT, id="france"),
    pb.Passage(text="Germany is a country in Central Europe. Its capital is Berlin, the largest city.", id="germany"),
    pb.Passage(text="Ålesund 🌊 is a town in Norway; the capital of Norway is Oslo.", id="norway"),
]


@pytest.fixture
async def stub(tiny_server: tuple[QAServer, str]) -> AsyncIterator[pb_grpc.QuestionAnsweringServiceStub]:
    async with grpc.aio.insecure_channel(tiny_server[1]) as channel:
        yield pb_grpc.QuestionAnsweringServiceStub(channel)


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for packed in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if packed.Unpack(bad):
                    return [v.field for v in bad.field_violations]
    return []


async def test_read_ranks_answers_across_passages(stub: pb_grpc.QuestionAnsweringServiceStub) -> None:
    response = await stub.Read(
        pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, top_k=5, no_answer=True), timeout=10
    )

    assert response.score_mode == pb.SCORE_MODE_CALIBRATED
    assert len(response.answers) == 5
    assert [a.score for a in response.answers] == sorted((a.score for a in response.answers), reverse=True)
    for answer in response.answers:
        passage = PASSAGES[answer.passage_index]
        assert answer.passage_id == passage.id
        assert passage.text[answer.start : answer.end] == answer.answer
        encoded = passage.text.encode("utf-8")
        assert encoded[answer.byte_start : answer.byte_end].decode("utf-8") == answer.answer
        assert 0.0 < answer.score < 1.0
    assert response.HasField("no_answer_score")
    assert response.no_answer_score == pytest.approx(math.prod(1 - a.score for a in response.answers), rel=1e-9)
    assert response.windows == 3 and response.model.name == "tiny" and response.request_id


async def test_pipeline_mode_gives_each_passage_answers_answer(stub: pb_grpc.QuestionAnsweringServiceStub) -> None:
    response = await stub.Read(
        pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, top_k=4, score_mode=pb.SCORE_MODE_PIPELINE),
        timeout=10,
    )

    assert response.score_mode == pb.SCORE_MODE_PIPELINE
    assert not response.HasField("no_answer_score")
    for index, passage in enumerate(PASSAGES):
        alone = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=passage.text, top_k=4), timeout=10)
        mine = [(a.answer, a.score, a.start, a.end) for a in response.answers if a.passage_index == index]
        assert mine == [(a.answer, a.score, a.start, a.end) for a in alone.answers][: len(mine)]


async def test_a_repeated_read_comes_from_the_cache(stub: pb_grpc.QuestionAnsweringServiceStub) -> None:
    request = pb.ReadRequest(question="Which town is in Norway?", passages=PASSAGES, top_k=2)
    first = await stub.Read(request, timeout=10)
    again = await stub.Read(request, timeout=10)
    assert again.timing.cached and not first.timing.cached
    assert list(again.answers) == list(first.answers)


async def test_score_threshold_leaves_weaker_answers_out(stub: pb_grpc.QuestionAnsweringServiceStub) -> None:
    request = pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, top_k=5)
    answers = (await stub.Read(request, timeout=10)).answers
    request.score_threshold = answers[2].score
    kept = (await stub.Read(request, timeout=10)).answers
    assert list(kept) == [a for a in answers if a.score >= answers[2].score]


BAD_READS = pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ReadRequest(question=SEED_QUESTION), "passages"),
        (pb.ReadRequest(question=SEED_QUESTION, passages=[pb.Passage(text="Paris.")] * 101), "passages"),
        (
            pb.ReadRequest(question=SEED_QUESTION, passages=[PASSAGES[0], pb.Passage(text="  "), PASSAGES[1]]),
            "passages[1].text",
        ),
        (pb.ReadRequest(question=SEED_QUESTION, passages=[pb.Passage(text="a " * 30_000)] * 2), "passages"),
        (pb.ReadRequest(question="", passages=PASSAGES), "question"),
        (pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, top_k=21), "top_k"),
        (pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, calibration_factor=-1), "calibration_factor"),
        (pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, overlap_threshold=2), "overlap_threshold"),
        (pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, score_mode=7), "score_mode"),  # type: ignore[arg-type]
        (pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, max_seq_len=100_000), "max_seq_len"),
    ],
    ids=[
        "no-passages",
        "too-many",
        "empty-passage",
        "too-many-characters",
        "no-question",
        "top-k",
        "calibration",
        "overlap",
        "score-mode",
        "max-seq-len",
    ],
)


@BAD_READS
async def test_bad_reads_are_invalid_argument_naming_the_field(
    stub: pb_grpc.QuestionAnsweringServiceStub, request_: pb.ReadRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Read(request_, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == [field]
    assert field in (caught.value.details() or "")


async def test_read_over_http_is_the_grpc_read(embedded_server: tuple[QAServer, str, str]) -> None:
    _, url, target = embedded_server
    request = pb.ReadRequest(question=SEED_QUESTION, passages=PASSAGES, top_k=3, no_answer=True)
    async with grpc.aio.insecure_channel(target) as channel:
        expected = await pb_grpc.QuestionAnsweringServiceStub(channel).Read(request, timeout=30)

    reply = await http_request(f"{url}/v1/read", json_format.MessageToDict(request))

    assert reply.status == 200, reply.body
    got = json_format.ParseDict(reply.json(), pb.ReadResponse())
    assert list(got.answers) == list(expected.answers)
    assert got.no_answer_score == expected.no_answer_score and got.score_mode == pb.SCORE_MODE_CALIBRATED
    assert len(got.answers) == 3 and got.answers[0].passage_id


@BAD_READS
async def test_bad_reads_over_http_are_400_naming_the_field(
    embedded_server: tuple[QAServer, str, str], request_: pb.ReadRequest, field: str
) -> None:
    reply = await http_request(f"{embedded_server[1]}/v1/read", json_format.MessageToDict(request_))
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["field"] == field
