"""The one place protobuf messages become domain types and back."""

from __future__ import annotations

from qaserve.qa import Answer, QAParams, QAProgress, QARequest, QAResult
from qaserve_client.v1 import question_answering_pb2 as pb


def qa_request(msg: pb.AnswerRequest) -> QARequest:
    """AnswerRequest -> QARequest; unset optional fields stay None for the model's defaults (then the pipeline's)."""
    defaults = QAParams()
    return QARequest(
        question=msg.question,
        context=msg.context,
        model=msg.model,
        params=QAParams(
            top_k=msg.top_k if msg.HasField("top_k") else None,
            max_answer_len=msg.max_answer_len if msg.HasField("max_answer_len") else None,
            max_seq_len=msg.max_seq_len if msg.HasField("max_seq_len") else None,
            doc_stride=msg.doc_stride if msg.HasField("doc_stride") else None,
            max_question_len=msg.max_question_len if msg.HasField("max_question_len") else defaults.max_question_len,
            handle_impossible_answer=msg.handle_impossible_answer,
            align_to_words=msg.align_to_words if msg.HasField("align_to_words") else defaults.align_to_words,
        ),
    )


def answers(items: tuple[Answer, ...]) -> list[pb.Answer]:
    return [
        pb.Answer(
            answer=a.answer, score=a.score, start=a.start, end=a.end, byte_start=a.byte_start, byte_end=a.byte_end
        )
        for a in items
    ]


def partial_answer(progress: QAProgress) -> pb.PartialAnswer:
    """QAProgress -> PartialAnswer."""
    return pb.PartialAnswer(
        answers=answers(progress.answers),
        windows_done=progress.windows_done,
        windows_total=progress.windows_total,
    )


def answer_response(result: QAResult, request_id: str = "") -> pb.AnswerResponse:
    """QAResult -> AnswerResponse, carrying the request id of the call that answered it."""
    return pb.AnswerResponse(
        answers=answers(result.answers),
        model=pb.ModelRef(
            name=result.model.name,
            revision=result.model.revision,
            device=result.model.device,
            dtype=result.model.dtype,
        ),
        timing=pb.ServerTiming(
            total_seconds=result.timing.total,
            tokenize_seconds=result.timing.tokenize,
            queue_seconds=result.timing.queue,
            forward_seconds=result.timing.forward,
            decode_seconds=result.timing.decode,
            cached=result.timing.cached,
        ),
        windows=result.windows,
        request_id=request_id,
    )


def progressive_response(update: QAProgress | QAResult, request_id: str = "") -> pb.AnswerProgressiveResponse:
    """A partial (QAProgress) or the final answer (QAResult) of AnswerProgressive, with the call's request id."""
    if isinstance(update, QAProgress):
        return pb.AnswerProgressiveResponse(partial=partial_answer(update), request_id=request_id)
    return pb.AnswerProgressiveResponse(final=answer_response(update, request_id), request_id=request_id)
