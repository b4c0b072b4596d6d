"""The reader's ranking across passages against hand-built logits: both score modes, dedup, no-answer, threshold."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from test_decoding import HIGH, token_at, windows_for, zero_logits

from qaserve.errors import InvalidArgument
from qaserve.qa import (
    Passage,
    QAParams,
    ReadParams,
    ReadRequest,
    ScoreMode,
    Windows,
    decode_answers,
    read_answers,
)
from qaserve.qa.decoding import Logits

QUESTION = "Where did they go?"
SHORT = "They went to Paris."
LONG = "It was a long trip for everyone involved, and in the end they went to Rome by train."


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def passage_logits(tokenizer: Any, text: str, spans: dict[tuple[int, int], float], **params: Any) -> Any:
    """Windows and zero logits of `text`, with start and end logits `value` at the tokens starting at char s / e
    for each (s, e): value in `spans`."""
    windows, resolved = windows_for(tokenizer, QUESTION, text, **params)
    start, end = zero_logits(windows)
    for (s, e), value in spans.items():
        start[0, token_at(windows, 0, s)] = value
        end[0, token_at(windows, 0, e)] = value
    return windows, (start, end), resolved


def read(
    passages: list[tuple[str, Windows, tuple[Logits, Logits]]], params: QAParams, **read_params: Any
) -> tuple[Any, float | None]:
    request = ReadRequest(
        QUESTION,
        tuple(Passage(text, f"doc-{i}") for i, (text, _, _) in enumerate(passages)),
        params=params,
        read=ReadParams(**read_params),
    )
    return read_answers(request, [w for _, w, _ in passages], [logits for _, _, logits in passages], params)


def test_calibrated_scores_compare_across_passages(tokenizer: Any) -> None:
    # "Paris" in a short passage and "Rome" in a long one, with slightly higher logits for Rome: softmax scores
    # within each passage would favour the short passage (fewer tokens share the mass); calibrated ones do not.
    paris = SHORT.index("Paris")
    rome = LONG.index("Rome")
    short_w, short_l, params = passage_logits(tokenizer, SHORT, {(paris, paris): HIGH})
    long_w, long_l, _ = passage_logits(tokenizer, LONG, {(rome, rome): HIGH + 0.5})
    params = dataclasses.replace(params, top_k=2)

    answers, _ = read([(SHORT, short_w, short_l), (LONG, long_w, long_l)], params, calibration_factor=0.1)

    assert [(a.answer, a.passage_index, a.passage_id) for a in answers] == [("Rome", 1, "doc-1"), ("Paris", 0, "doc-0")]
    assert answers[0].score == pytest.approx(sigmoid(2 * (HIGH + 0.5) * 0.1), rel=1e-5)
    assert answers[1].score == pytest.approx(sigmoid(2 * HIGH * 0.1), rel=1e-5)
    assert (answers[0].start, answers[0].end) == (rome, rome + len("Rome"))
    assert LONG[answers[0].start : answers[0].end] == "Rome"

    pipeline, _ = read([(SHORT, short_w, short_l), (LONG, long_w, long_l)], params, score_mode=ScoreMode.PIPELINE)
    assert pipeline[0].answer == "Paris"  # per-window softmax: the shorter passage's answer wins


def test_calibration_factor_scales_the_summed_logits(tokenizer: Any) -> None:
    paris = SHORT.index("Paris")
    windows, logits, params = passage_logits(tokenizer, SHORT, {(paris, paris): 3.0})
    [best], _ = read([(SHORT, windows, logits)], params, calibration_factor=0.5)
    assert best.score == pytest.approx(sigmoid(6.0 * 0.5), rel=1e-5)


def test_pipeline_mode_gives_each_passage_the_answers_of_answer(tokenizer: Any) -> None:
    paris = SHORT.index("Paris")
    rome = LONG.index("Rome")
    short_w, short_l, params = passage_logits(tokenizer, SHORT, {(paris, paris): HIGH})
    long_w, long_l, _ = passage_logits(tokenizer, LONG, {(rome, rome): HIGH})
    params = dataclasses.replace(params, top_k=3)

    answers, _ = read([(SHORT, short_w, short_l), (LONG, long_w, long_l)], params, score_mode=ScoreMode.PIPELINE)

    for index, (text, windows, (start, end)) in enumerate([(SHORT, short_w, short_l), (LONG, long_w, long_l)]):
        alone = decode_answers(text, windows, start, end, params)
        mine = [(a.answer, a.score, a.start, a.end) for a in answers if a.passage_index == index]
        assert mine == [(a.answer, a.score, a.start, a.end) for a in alone][: len(mine)]
    assert len(answers) == 3
    assert [a.score for a in answers] == sorted((a.score for a in answers), reverse=True)


def test_overlapping_answers_of_one_passage_are_dropped(tokenizer: Any) -> None:
    text = "I want to go to the river in Maine."
    the, river, maine = text.index("the"), text.index("river"), text.index("Maine")
    windows, (start, end), params = passage_logits(tokenizer, text, {})
    start[0, token_at(windows, 0, the)] = 9.0
    end[0, token_at(windows, 0, river)] = 9.0  # "the river" is the best span
    end[0, token_at(windows, 0, maine)] = 8.5  # "the river in Maine" overlaps it
    start[0, token_at(windows, 0, maine)] = 7.0  # "Maine" does not
    params = dataclasses.replace(params, top_k=3)
    passages = [(text, windows, (start, end))]

    deduplicated, _ = read(passages, params)
    # "the river in Maine", "the", "river", ... all overlap "the river" or "Maine", within the window's best spans
    assert [a.answer for a in deduplicated] == ["the river", "Maine"]

    everything, _ = read(passages, params, overlap_threshold=1.0)
    assert [a.answer for a in everything][:2] == ["the river", "the river in Maine"]


def test_the_same_span_from_two_passages_is_kept_twice(tokenizer: Any) -> None:
    paris = SHORT.index("Paris")
    windows, logits, params = passage_logits(tokenizer, SHORT, {(paris, paris): HIGH})
    params = dataclasses.replace(params, top_k=2)
    answers, _ = read([(SHORT, windows, logits), (SHORT, windows, logits)], params)
    assert [(a.answer, a.passage_index) for a in answers] == [("Paris", 0), ("Paris", 1)]


def test_no_answer_score_in_both_modes(tokenizer: Any) -> None:
    paris = SHORT.index("Paris")
    windows, (start, end), params = passage_logits(tokenizer, SHORT, {(paris, paris): 2.0})
    start[0, 0] = 4.0  # CLS: the model's no-answer logits, used by the pipeline mode only
    end[0, 0] = 4.0
    params = dataclasses.replace(params, top_k=2)
    passages = [(SHORT, windows, (start, end))]

    answers, no_answer = read(passages, params, no_answer=True)
    assert no_answer == pytest.approx(math.prod(1 - a.score for a in answers))
    assert read(passages, params)[1] is None  # not asked for

    _, pipeline_no_answer = read(passages, params, no_answer=True, score_mode=ScoreMode.PIPELINE)
    [impossible] = [
        a
        for a in decode_answers(
            SHORT, windows, start, end, dataclasses.replace(params, top_k=20, handle_impossible_answer=True)
        )
        if a.answer == ""
    ]
    assert pipeline_no_answer == pytest.approx(impossible.score)


def test_score_threshold_keeps_answers_at_or_above_it(tokenizer: Any) -> None:
    paris = SHORT.index("Paris")
    windows, logits, params = passage_logits(tokenizer, SHORT, {(paris, paris): HIGH})
    params = dataclasses.replace(params, top_k=5)
    answers, _ = read([(SHORT, windows, logits)], params)
    assert len(answers) == 5
    between = (answers[0].score + answers[1].score) / 2
    assert read([(SHORT, windows, logits)], params, score_threshold=between)[0] == answers[:1]
    lowest = answers[-1].score
    assert read([(SHORT, windows, logits)], params, score_threshold=lowest)[0] == answers  # at the threshold: kept


def test_answers_are_cut_to_top_k_across_passages(tokenizer: Any) -> None:
    windows, logits, params = passage_logits(tokenizer, SHORT, {})
    answers, _ = read([(SHORT, windows, logits)] * 3, dataclasses.replace(params, top_k=4))
    assert len(answers) == 4


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ReadRequest(QUESTION, ()), "passages"),
        (ReadRequest(QUESTION, (Passage("a"),) * 4), "passages"),
        (ReadRequest(QUESTION, (Passage("Paris."), Passage(" \u200b "), Passage("Rome."))), "passages[1].text"),
        (ReadRequest(QUESTION, (Passage("x" * 6), Passage("y" * 5))), "passages"),
        (ReadRequest(" ", (Passage("Paris."),)), "question"),
        (ReadRequest(QUESTION, (Passage("Paris."),), params=QAParams(top_k=0)), "top_k"),
        (ReadRequest(QUESTION, (Passage("Paris."),), read=ReadParams(calibration_factor=0.0)), "calibration_factor"),
        (ReadRequest(QUESTION, (Passage("Paris."),), read=ReadParams(score_threshold=math.nan)), "score_threshold"),
        (ReadRequest(QUESTION, (Passage("Paris."),), read=ReadParams(overlap_threshold=1.5)), "overlap_threshold"),
    ],
)
def test_bad_read_requests_name_the_field(request_: ReadRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        request_.validate(max_context_chars=10, max_passages=3)
    assert raised.value.field == field


def test_masked_spans_never_answer(tokenizer: Any) -> None:
    windows, (start, end), params = passage_logits(tokenizer, "Paris.", {})
    start[:] = -np.inf  # nothing can start anywhere
    answers, no_answer = read([("Paris.", windows, (start, end))], params, no_answer=True)
    assert answers == ()
    assert no_answer == 1.0
