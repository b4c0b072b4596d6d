"""pb <-> domain mapping (api/converters.py): defaults for unset fields, every field carried both ways."""

from __future__ import annotations

from qaserve.api import converters
from qaserve.qa import Answer, ModelRef, QAParams, QAProgress, QAResult, Timing
from qaserve_client.v1 import question_answering_pb2 as pb

ANSWERS = (
    Answer("Zürich", 0.75, 10, 16, 10, 17),
    Answer("café", 1.5, 0, 4, 0, 5),  # merged scores may exceed 1
)
RESULT = QAResult(
    answers=ANSWERS,
    model=ModelRef(name="tiny", revision="sha256:ab", device="cpu", dtype="float32"),
    timing=Timing(total=0.5, tokenize=0.1, queue=0.2, forward=0.15, decode=0.05),
    windows=3,
)


def test_unset_fields_take_the_pipeline_defaults() -> None:
    request = converters.qa_request(pb.AnswerRequest(question="Q?", context="C."))

    assert (request.question, request.context, request.model) == ("Q?", "C.", "")
    assert request.params == QAParams()
    assert request.params.max_seq_len is None and request.params.doc_stride is None  # the model resolves them


def test_set_fields_are_carried_including_explicit_zeroes_and_false() -> None:
    message = pb.AnswerRequest(
        question="Q?",
        context="C.",
        model="m",
        top_k=0,
        max_answer_len=7,
        max_seq_len=96,
        doc_stride=0,
        max_question_len=12,
        handle_impossible_answer=True,
        align_to_words=False,
    )

    request = converters.qa_request(message)

    assert request.model == "m"
    assert request.params == QAParams(
        top_k=0,  # out of range, and validation says so: an explicit 0 must not become the default
        max_answer_len=7,
        max_seq_len=96,
        doc_stride=0,
        max_question_len=12,
        handle_impossible_answer=True,
        align_to_words=False,
    )


def test_answer_response_carries_answers_model_timing_and_windows() -> None:
    response = converters.answer_response(RESULT)

    assert [(a.answer, a.start, a.end, a.byte_start, a.byte_end) for a in response.answers] == [
        ("Zürich", 10, 16, 10, 17),
        ("café", 0, 4, 0, 5),
    ]
    assert [round(a.score, 6) for a in response.answers] == [0.75, 1.5]
    assert (response.model.name, response.model.revision, response.model.device, response.model.dtype) == (
        "tiny",
        "sha256:ab",
        "cpu",
        "float32",
    )
    t = response.timing
    assert (t.total_seconds, t.tokenize_seconds, t.queue_seconds, t.forward_seconds, t.decode_seconds) == (
        0.5,
        0.1,
        0.2,
        0.15,
        0.05,
    )
    assert response.windows == 3


def test_progressive_responses_are_partial_then_final() -> None:
    partial = converters.progressive_response(QAProgress(ANSWERS[:1], windows_done=2, windows_total=5))
    final = converters.progressive_response(RESULT)

    assert partial.WhichOneof("update") == "partial"
    assert (partial.partial.windows_done, partial.partial.windows_total) == (2, 5)
    assert [a.answer for a in partial.partial.answers] == ["Zürich"]
    assert final.WhichOneof("update") == "final"
    assert final.final == converters.answer_response(RESULT)
