"""All mapping between the qaserve.v1 messages and the client's request and result types."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from qaserve_client.errors import QAServeError, error_from_status
from qaserve_client.items import ManyItem
from qaserve_client.results import Answer, AnswerResult, ManyResult, ModelRef, Progress, ServerTiming
from qaserve_client.v1 import question_answering_pb2 as pb


def build_request(
    question: str,
    context: str,
    *,
    model: str = "",
    top_k: int | None = None,
    max_answer_len: int | None = None,
    max_seq_len: int | None = None,
    doc_stride: int | None = None,
    max_question_len: int | None = None,
    handle_impossible_answer: bool = False,
    align_to_words: bool | None = None,
) -> pb.AnswerRequest:
    """Builds an AnswerRequest; a None option stays unset so that the server applies its default."""
    # Passing None for a proto3 optional field leaves it unset (HasField is False).
    return pb.AnswerRequest(
        question=question,
        context=context,
        model=model,
        top_k=top_k,
        max_answer_len=max_answer_len,
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
        max_question_len=max_question_len,
        handle_impossible_answer=handle_impossible_answer,
        align_to_words=align_to_words,
    )


def build_many_request(item: ManyItem) -> pb.AnswerManyRequest:
    """Builds the AnswerManyRequest of one answer_many item."""
    return pb.AnswerManyRequest(
        id=item.id,
        request=build_request(
            item.question,
            item.context,
            model=item.model,
            top_k=item.top_k,
            max_answer_len=item.max_answer_len,
            max_seq_len=item.max_seq_len,
            doc_stride=item.doc_stride,
            max_question_len=item.max_question_len,
            handle_impossible_answer=item.handle_impossible_answer,
            align_to_words=item.align_to_words,
        ),
    )


def result_from_response(response: pb.AnswerResponse) -> AnswerResult:
    """Converts an AnswerResponse into an AnswerResult."""
    return AnswerResult(
        answers=_answers(response.answers),
        model=ModelRef(
            name=response.model.name,
            revision=response.model.revision,
            device=response.model.device,
            dtype=response.model.dtype,
        ),
        timing=ServerTiming(
            total_seconds=response.timing.total_seconds,
            tokenize_seconds=response.timing.tokenize_seconds,
            queue_seconds=response.timing.queue_seconds,
            forward_seconds=response.timing.forward_seconds,
            decode_seconds=response.timing.decode_seconds,
        ),
        windows=response.windows,
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
        )
    if kind == "final":
        return result_from_response(response.final)
    return None


def result_from_many(response: pb.AnswerManyResponse) -> ManyResult:
    """Converts one AnswerMany response into a ManyResult holding either the answers or the item's error."""
    kind = response.WhichOneof("result")
    if kind == "response":
        return ManyResult(id=response.id, result=result_from_response(response.response), error=None)
    if kind == "error":
        return ManyResult(id=response.id, result=None, error=error_from_status(response.error))
    # Neither field this client knows: the item did not succeed as far as the caller can tell.
    error = QAServeError(grpc.StatusCode.UNKNOWN, "the server's response carries neither answers nor an error")
    return ManyResult(id=response.id, result=None, error=error)


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
