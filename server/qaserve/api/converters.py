"""The one place protobuf messages become domain types and back."""

from __future__ import annotations

from qaserve.errors import InvalidArgument
from qaserve.qa import (
    Answer,
    ModelRef,
    Passage,
    QAParams,
    QAProgress,
    QARequest,
    QAResult,
    ReadParams,
    ReadRequest,
    ReadResult,
    ScoreMode,
    Timing,
)
from qaserve_client.v1 import question_answering_pb2 as pb

# The score modes by their proto number; SCORE_MODE_UNSPECIFIED takes the reader's default.
_SCORE_MODES = {
    pb.SCORE_MODE_UNSPECIFIED: ScoreMode.CALIBRATED,
    pb.SCORE_MODE_CALIBRATED: ScoreMode.CALIBRATED,
    pb.SCORE_MODE_PIPELINE: ScoreMode.PIPELINE,
}
_SCORE_MODE_NUMBERS = {ScoreMode.CALIBRATED: pb.SCORE_MODE_CALIBRATED, ScoreMode.PIPELINE: pb.SCORE_MODE_PIPELINE}


def qa_request(msg: pb.AnswerRequest) -> QARequest:
    """AnswerRequest -> QARequest; unset optional fields stay None for the model's defaults (then the pipeline's)."""
    return QARequest(
        question=msg.question,
        context=msg.context,
        model=msg.model,
        params=_params(msg, handle_impossible_answer=msg.handle_impossible_answer),
    )


def read_request(msg: pb.ReadRequest) -> ReadRequest:
    """ReadRequest -> the domain's ReadRequest; an unknown score mode is an InvalidArgument naming the field."""
    if msg.score_mode not in _SCORE_MODES:
        raise InvalidArgument("score_mode", f"unknown score mode {msg.score_mode}")
    defaults = ReadParams()
    return ReadRequest(
        question=msg.question,
        passages=tuple(Passage(p.text, p.id) for p in msg.passages),
        model=msg.model,
        params=_params(msg, handle_impossible_answer=False),
        read=ReadParams(
            score_mode=_SCORE_MODES[msg.score_mode],
            calibration_factor=(
                msg.calibration_factor if msg.HasField("calibration_factor") else defaults.calibration_factor
            ),
            score_threshold=msg.score_threshold if msg.HasField("score_threshold") else None,
            no_answer=msg.no_answer,
            overlap_threshold=msg.overlap_threshold if msg.HasField("overlap_threshold") else None,
        ),
    )


def _params(msg: pb.AnswerRequest | pb.ReadRequest, *, handle_impossible_answer: bool) -> QAParams:
    """The decoding parameters AnswerRequest and ReadRequest share (same field names)."""
    defaults = QAParams()
    return QAParams(
        top_k=msg.top_k if msg.HasField("top_k") else None,
        max_answer_len=msg.max_answer_len if msg.HasField("max_answer_len") else None,
        max_seq_len=msg.max_seq_len if msg.HasField("max_seq_len") else None,
        doc_stride=msg.doc_stride if msg.HasField("doc_stride") else None,
        max_question_len=msg.max_question_len if msg.HasField("max_question_len") else defaults.max_question_len,
        handle_impossible_answer=handle_impossible_answer,
        align_to_words=msg.align_to_words if msg.HasField("align_to_words") else defaults.align_to_words,
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
        model=_model_ref(result.model),
        timing=_timing(result.timing),
        windows=result.windows,
        request_id=request_id,
    )


def read_response(result: ReadResult, request_id: str = "") -> pb.ReadResponse:
    """ReadResult -> ReadResponse, carrying the request id of the call that answered it."""
    return pb.ReadResponse(
        answers=[
            pb.PassageAnswer(
                answer=a.answer,
                score=a.score,
                passage_index=a.passage_index,
                passage_id=a.passage_id,
                start=a.start,
                end=a.end,
                byte_start=a.byte_start,
                byte_end=a.byte_end,
            )
            for a in result.answers
        ],
        no_answer_score=result.no_answer_score,
        score_mode=_SCORE_MODE_NUMBERS[result.score_mode],
        model=_model_ref(result.model),
        timing=_timing(result.timing),
        windows=result.windows,
        request_id=request_id,
    )


def _model_ref(model: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(name=model.name, revision=model.revision, device=model.device, dtype=model.dtype)


def _timing(timing: Timing) -> pb.ServerTiming:
    return pb.ServerTiming(
        total_seconds=timing.total,
        tokenize_seconds=timing.tokenize,
        queue_seconds=timing.queue,
        forward_seconds=timing.forward,
        decode_seconds=timing.decode,
        cached=timing.cached,
    )


def progressive_response(update: QAProgress | QAResult, request_id: str = "") -> pb.AnswerProgressiveResponse:
    """A partial (QAProgress) or the final answer (QAResult) of AnswerProgressive, with the call's request id."""
    if isinstance(update, QAProgress):
        return pb.AnswerProgressiveResponse(partial=partial_answer(update), request_id=request_id)
    return pb.AnswerProgressiveResponse(final=answer_response(update, request_id), request_id=request_id)
