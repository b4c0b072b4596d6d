"""The reader: one question's answers ranked across several passages, in either score mode."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from qaserve.qa.decoding import (
    Logits,
    answer_at,
    calibrated_spans,
    candidates_per_window,
    merge_candidates,
    score_windows,
)
from qaserve.qa.types import PassageAnswer, QAParams, ReadRequest, ScoreMode
from qaserve.qa.windowing import Windows

# Spans each window offers in calibrated mode (Haystack ExtractiveReader's answers_per_seq); more when top_k
# asks for it.
ANSWERS_PER_WINDOW = 20


def read_answers(
    request: ReadRequest,
    windows: Sequence[Windows],
    logits: Sequence[tuple[Logits, Logits]],
    params: QAParams,
) -> tuple[tuple[PassageAnswer, ...], float | None]:
    """The top_k answers over every passage, best first, and the no-answer score (None unless asked for).

    windows[i] and logits[i] (start, end: [windows, length] float32) belong to passage i; `params` must be
    resolved. Answers are ranked by score, near-duplicates in one passage dropped (the overlap threshold), cut to
    top_k; the no-answer score is taken over those (calibrated: the probability that none of them is right,
    prod(1 - score); pipeline: the lowest no-answer probability of any window); score_threshold then filters the
    answers (not the no-answer score).
    """
    assert params.top_k is not None, "params must be resolved"
    read = request.read
    answers: list[PassageAnswer] = []
    null_scores: list[float] = []
    for index, (passage, passage_windows, (start, end)) in enumerate(
        zip(request.passages, windows, logits, strict=True)
    ):
        if read.score_mode is ScoreMode.PIPELINE:
            scored = score_windows(passage_windows, range(len(passage_windows)), start, end, params)
            null_scores.extend(window.null_score for window in scored)
            found = merge_candidates(passage.text, scored, dataclasses.replace(params, handle_impossible_answer=False))
        else:
            per_window = max(ANSWERS_PER_WINDOW, candidates_per_window(params))
            by_window = calibrated_spans(passage_windows, start, end, params, read.calibration_factor, per_window)
            found = [answer_at(passage.text, *span) for window_spans in by_window for span in window_spans]
        for answer in found:
            answers.append(PassageAnswer(**dataclasses.asdict(answer), passage_index=index, passage_id=passage.id))

    answers.sort(key=lambda a: a.score, reverse=True)  # stable: passage and window order among equal scores
    kept = _deduplicate(answers, read.resolved_overlap_threshold, params.top_k)
    no_answer: float | None = None
    if read.no_answer:
        if read.score_mode is ScoreMode.PIPELINE:
            no_answer = min(null_scores)
        else:
            no_answer = math.prod(1.0 - a.score for a in kept)
    if read.score_threshold is not None:
        kept = [a for a in kept if a.score >= read.score_threshold]
    return tuple(kept), no_answer


def _deduplicate(ranked: Sequence[PassageAnswer], overlap_threshold: float | None, limit: int) -> list[PassageAnswer]:
    """The first `limit` of `ranked` (best first) without repeats of a better answer's span in the same passage (the
    same span found in overlapping windows, or widened to the same words) and, with a threshold, without answers
    sharing more than that fraction of their own or a better answer's characters (Haystack's
    deduplicate_by_overlap, then its cut to top_k: an answer is only ever compared with better ones)."""
    kept: list[PassageAnswer] = []
    seen: set[tuple[int, int, int]] = set()
    for answer in ranked:
        if len(kept) == limit:
            break
        span = (answer.passage_index, answer.start, answer.end)
        if span in seen:
            continue
        if overlap_threshold is not None and any(_overlaps(answer, better, overlap_threshold) for better in kept):
            continue
        seen.add(span)
        kept.append(answer)
    return kept


def _overlaps(a: PassageAnswer, b: PassageAnswer, threshold: float) -> bool:
    """Whether two answers of one passage share more than `threshold` of either's characters (Haystack's rule:
    touching spans share nothing)."""
    if a.passage_index != b.passage_index or not (a.start <= b.end and b.start <= a.end):
        return False
    shared = min(a.end - a.start, a.end - b.start, b.end - a.start, b.end - b.start)
    return shared > 0 and (shared / (a.end - a.start) > threshold or shared / (b.end - b.start) > threshold)
