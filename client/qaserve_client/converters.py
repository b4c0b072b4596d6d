"""All mapping between the qaserve.v1 messages and the client's result types."""

from __future__ import annotations

from qaserve_client.results import Answer, AnswerResult, ModelRef, ServerTiming
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


def result_from_response(response: pb.AnswerResponse) -> AnswerResult:
    """Converts an AnswerResponse into an AnswerResult."""
    return AnswerResult(
        answers=tuple(
            Answer(
                answer=a.answer,
                score=a.score,
                start=a.start,
                end=a.end,
                byte_start=a.byte_start,
                byte_end=a.byte_end,
            )
            for a in response.answers
        ),
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
