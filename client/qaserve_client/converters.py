"""All mapping between the qaserve.v1 messages and the client's result types; requests are built in options.py."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from qaserve_client.errors import QAServeError, error_from_status
from qaserve_client.items import ManyItem
from qaserve_client.options import answer_request
from qaserve_client.results import (
    Answer,
    AnswerResult,
    ManyResult,
    ModelRef,
    PassageAnswer,
    Progress,
    ReadResult,
    ServerTiming,
)
from qaserve_client.v1 import question_answering_pb2 as pb


def many_request(item: ManyItem) -> pb.AnswerManyRequest:
    """Builds the AnswerManyRequest of one answer_many item."""
    return pb.AnswerManyRequest(id=item.id, request=answer_request(item.question, item.context, item))


def result_from_response(response: pb.AnswerResponse) -> AnswerResult:
    """Converts an AnswerResponse into an AnswerResult."""
    return AnswerResult(
        answers=_answers(response.answers),
        model=_model_ref(response.model),
        timing=_timing(response.timing),
        windows=response.windows,
        request_id=response.request_id,
    )


def result_from_read(response: pb.ReadResponse) -> ReadResult:
    """Converts a ReadResponse into a ReadResult."""
    return ReadResult(
        answers=tuple(
            PassageAnswer(
                answer=a.answer,
                score=a.score,
                passage_index=a.passage_index,
                passage_id=a.passage_id,
                start=a.start,
                end=a.end,
                byte_start=a.byte_start,
                byte_end=a.byte_end,
            )
            for a in response.answers
        ),
        no_answer_score=response.no_answer_score if response.HasField("no_answer_score") else None,
        score_mode=_score_mode(response.score_mode),
        model=_model_ref(response.model),
        timing=_timing(response.timing),
        windows=response.windows,
        request_id=response.request_id,
    )


def _score_mode(number: pb.ScoreMode.ValueType) -> str:
    """ "calibrated" or "pipeline"; a mode added to the proto after this client, by its number."""
    try:
        name: str = pb.ScoreMode.Name(number)
    except ValueError:
        return str(number)
    return name.removeprefix("SCORE_MODE_").lower()


def _model_ref(model: pb.ModelRef) -> ModelRef:
    return ModelRef(name=model.name, revision=model.revision, device=model.device, dtype=model.dtype)


def _timing(timing: pb.ServerTiming) -> ServerTiming:
    return ServerTiming(
        total_seconds=timing.total_seconds,
        tokenize_seconds=timing.tokenize_seconds,
        queue_seconds=timing.queue_seconds,
        forward_seconds=timing.forward_seconds,
        decode_seconds=timing.decode_seconds,
        cached=timing.cached,
    )


def update_from_progressive(response: pb.AnswerProgressiveResponse) -> Progress | AnswerResult | None:
    """Converts one AnswerProgressive message: a partial into Progress, the final into an AnswerResult.

    Returns None for a message with no update this client knows, such as one added to the oneof later.
    """
    kind = response.WhichOneof("update")
    if kind == "partial":
        return Progress(
            answers=_answers(response.partial.answers),
            windows_done=response.partial.windows_done,
            windows_total=response.partial.windows_total,
            request_id=response.request_id,
        )
    if kind == "final":
        return result_from_response(response.final)
    return None


def result_from_many(response: pb.AnswerManyResponse) -> ManyResult:
    """Converts one AnswerMany response into a ManyResult holding either the answers or the item's error."""
    kind = response.WhichOneof("result")
    if kind == "response":
        result = result_from_response(response.response)
        return ManyResult(id=response.id, result=result, error=None, request_id=response.request_id)
    request_id = response.request_id or None
    if kind == "error":
        error = error_from_status(response.error, request_id)
    else:
        # Neither field this client knows: the item did not succeed as far as the caller can tell.
        message = "the server's response carries neither answers nor an error"
        error = QAServeError(grpc.StatusCode.UNKNOWN, message, request_id=request_id)
    return ManyResult(id=response.id, result=None, error=error, request_id=response.request_id)


def _answers(answers: Iterable[pb.Answer]) -> tuple[Answer, ...]:
    return tuple(
        Answer(
            answer=a.answer,
            score=a.score,
            start=a.start,
            end=a.end,
            byte_start=a.byte_start,
            byte_end=a.byte_end,
        )
        for a in answers
    )
