"""Turns start/end logits of a request's windows into scored answer spans (the HF QA pipeline's decoding)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qaserve.qa.types import Answer, QAParams
from qaserve.qa.windowing import Windows

# Logit given to tokens that cannot be part of an answer, so they take no probability mass (as in the pipeline).
MASKED_LOGIT = -10000.0

Logits = npt.NDArray[np.float32]


@dataclass(frozen=True)
class WindowCandidates:
    """One window's best spans as (score, char_start, char_end), best first, and its no-answer (CLS) score."""

    spans: list[tuple[float, int, int]]
    null_score: float


def decode_answers(
    context: str, windows: Windows, start_logits: Logits, end_logits: Logits, params: QAParams
) -> list[Answer]:
    """Best answers over all windows, highest score first.

    start_logits/end_logits: float32 arrays [windows, length], right-padded past each window's tokens. Per window,
    probabilities are a softmax over its answer tokens (context + CLS); a span scores p_start x p_end for
    start <= end < start + max_answer_len, CLS excluded. Spans that give the same text (case-insensitively) add
    their scores, the first one's offsets kept. With handle_impossible_answer the empty answer scores the lowest
    CLS probability over windows.
    """
    candidates = score_windows(windows, range(len(windows)), start_logits, end_logits, params)
    return merge_candidates(context, candidates, params)


def score_windows(
    windows: Windows,
    indices: Sequence[int],
    start_logits: Logits,
    end_logits: Logits,
    params: QAParams,
) -> list[WindowCandidates]:
    """Candidates of the windows `indices` (row i of the logits belongs to window indices[i]), vectorised."""
    assert params.top_k is not None and params.max_answer_len is not None, "params must be resolved"
    rows = start_logits.shape[0]
    mask = _rows_mask(windows.answer_masks, indices, start_logits.shape)
    # Start and end rows stacked: one masking and one softmax for both (row by row, so the same numbers).
    logits = np.concatenate((start_logits, end_logits)).astype(np.float32, copy=False)
    probabilities = _softmax(np.where(np.concatenate((mask, mask)), logits, np.float32(MASKED_LOGIT)))
    start, end = probabilities[:rows], probabilities[rows:]
    null_scores = (start[:, 0] * end[:, 0]).tolist()
    probabilities[:, 0] = 0.0
    span = min(params.max_answer_len, start.shape[1])
    scores = _span_band(start, end, span, np.multiply, 0.0)
    spans = _best_spans(windows, indices, scores, span, candidates_per_window(params), params.align_to_words)
    return [WindowCandidates(found, null) for found, null in zip(spans, null_scores, strict=True)]


def candidates_per_window(params: QAParams) -> int:
    """Spans a window offers for top_k answers: the pipeline keeps extra ones when aligning to words, as several
    token spans can widen to the same words and merge."""
    assert params.top_k is not None, "params must be resolved"
    return params.top_k * 2 + 10 if params.align_to_words else params.top_k


def calibrated_spans(
    windows: Windows,
    start_logits: Logits,
    end_logits: Logits,
    params: QAParams,
    calibration_factor: float,
    per_window: int,
) -> list[list[tuple[float, int, int]]]:
    """Per window, its best `per_window` spans as (score, char_start, char_end), best first, each scored on its
    own as Haystack's ExtractiveReader does: sigmoid((start logit + end logit) x calibration_factor), over the
    context's tokens only (no CLS), start <= end < start + max_answer_len."""
    assert params.max_answer_len is not None, "params must be resolved"
    context_masks = [[seq == windows.context_index for seq in encoding.sequence_ids] for encoding in windows.encodings]
    mask = _rows_mask(context_masks, range(len(windows)), start_logits.shape)
    start = np.where(mask, start_logits.astype(np.float32, copy=False), np.float32(-np.inf))
    end = np.where(mask, end_logits.astype(np.float32, copy=False), np.float32(-np.inf))
    span = min(params.max_answer_len, start.shape[1])
    logits = _span_band(start, end, span, np.add, -np.inf)
    # sigmoid(x) = exp(-log(1 + exp(-x))): no overflow for large logits, exactly 0 for masked spans.
    scores = np.exp(-np.logaddexp(np.float32(0.0), -logits * np.float32(calibration_factor)))
    return _best_spans(windows, range(len(windows)), scores, span, per_window, params.align_to_words)


def _rows_mask(
    masks: Sequence[Sequence[bool]], indices: Sequence[int], shape: tuple[int, ...]
) -> npt.NDArray[np.bool_]:
    """[rows, length] mask: row i holds masks[indices[i]], False past its end."""
    mask = np.zeros(shape, dtype=bool)
    for row, w in enumerate(indices):
        mask[row, : len(masks[w])] = masks[w]
    return mask


def _span_band(start: Logits, end: Logits, span: int, combine: Any, pad: float) -> Logits:
    """band[w, i * span + k] = combine(start[w, i], end[w, i + k]) for 0 <= k < span (past the end: `pad`): only
    the spans allowed, so memory grows with windows x length x max_answer_len, not length squared."""
    n_rows, length = start.shape
    padded_end = np.full((n_rows, length + span - 1), pad, dtype=end.dtype)
    padded_end[:, :length] = end
    # bands[w, i, k] = padded_end[w, i + k]: a read-only view, rows of `span` overlapping values.
    row_stride, step = padded_end.strides
    bands = np.lib.stride_tricks.as_strided(
        padded_end, (n_rows, length, span), (row_stride, step, step), writeable=False
    )
    band: Logits = combine(start[:, :, None], bands).reshape(n_rows, -1)
    return band


def _best_spans(
    windows: Windows, indices: Sequence[int], scores: Logits, span: int, per_window: int, align_to_words: bool
) -> list[list[tuple[float, int, int]]]:
    """Per row of a _span_band (row i: window indices[i]), its `per_window` best spans with a positive score as
    (score, char_start, char_end), best first."""
    top_index = _top_k(scores, min(per_window, scores.shape[1]))
    top_scores = scores[np.arange(scores.shape[0])[:, None], top_index]
    result = []
    for row, w in enumerate(indices):
        encoding = windows.encodings[w]
        spans = []
        for score, index in zip(top_scores[row].tolist(), top_index[row].tolist(), strict=True):
            if score <= 0.0:
                break  # only masked or out-of-band spans are left in this window
            s, k = divmod(index, span)
            spans.append((score, *_char_span(encoding, s, s + k, windows.context_index, align_to_words)))
        result.append(spans)
    return result


def merge_candidates(context: str, candidates: Sequence[WindowCandidates], params: QAParams) -> list[Answer]:
    """Merges windows' candidates (in window order) into the top_k answers."""
    found: dict[str, _Merged] = {}
    _add_spans(context, candidates, found, {})
    return _ranked(context, found.values(), min((c.null_score for c in candidates), default=None), params)


class RunningMerge:
    """merge_candidates over windows added as they are scored, in any order: answers() equals merge_candidates of
    the windows added so far, in window order. Adding a window costs its own spans, not those of every window
    added before it."""

    def __init__(self, context: str, params: QAParams) -> None:
        assert params.top_k is not None, "params must be resolved"
        self._context = context
        self._params = params
        self._top_k = params.top_k
        self._found: dict[str, _Merged] = {}  # windows 0 .. _next - 1
        # _found's top_k texts. Scores only grow, so only a text that later windows add to can pass them.
        self._leaders: list[str] = []
        self._next = 0
        self._ahead: dict[int, WindowCandidates] = {}  # windows added while an earlier one is missing
        self._null_score: float | None = None

    @property
    def windows(self) -> int:
        """How many windows were added."""
        return self._next + len(self._ahead)

    def add(self, index: int, window: WindowCandidates) -> None:
        """Adds the candidates of window `index`."""
        self._ahead[index] = window
        null_score = window.null_score
        self._null_score = null_score if self._null_score is None else min(self._null_score, null_score)
        while self._next in self._ahead:
            touched = _add_spans(self._context, [self._ahead.pop(self._next)], self._found, {})
            self._leaders = _best(self._top_k, {key: self._found[key] for key in (*self._leaders, *touched)})
            self._next += 1

    def answers(self) -> list[Answer]:
        """The top_k answers among the windows added so far."""
        ahead: dict[str, _Merged] = {}  # the texts of the windows past the missing one, with their totals
        _add_spans(self._context, [self._ahead[i] for i in sorted(self._ahead)], ahead, self._found)
        contenders = {key: self._found[key] for key in self._leaders} | ahead
        return _ranked(self._context, contenders.values(), self._null_score, self._params)


# A text's merge: (summed score, char_start, char_end, order), the span of the first window that found it, and how
# many texts were found before it (which decides between equal scores).
_Merged = tuple[float, int, int, int]


def _add_spans(
    context: str, candidates: Iterable[WindowCandidates], found: dict[str, _Merged], earlier: Mapping[str, _Merged]
) -> list[str]:
    """Adds the windows' spans, in order, to `found` by lower-cased text: scores summed, the first span kept. A text
    new to `found` continues its entry in `earlier`, or comes after every text of both. Returns the texts added to."""
    touched = []
    for window in candidates:
        for score, char_start, char_end in window.spans:
            key = context[char_start:char_end].lower()
            known = found.get(key) or earlier.get(key)
            if known is None:
                found[key] = (score, char_start, char_end, len(earlier) + len(found))
            else:
                found[key] = (known[0] + score, known[1], known[2], known[3])
            touched.append(key)
    return touched


def _best(k: int, found: Mapping[str, _Merged]) -> list[str]:
    """The k best texts of `found`, best first."""
    return heapq.nsmallest(k, found, key=lambda key: _rank(found[key]))


def _rank(merged: _Merged) -> tuple[float, int]:
    """Sorts best first: the highest score, between equal scores the text found first."""
    return -merged[0], merged[3]


def _ranked(context: str, found: Iterable[_Merged], null_score: float | None, params: QAParams) -> list[Answer]:
    """The top_k answers among the merged texts and, with handle_impossible_answer, the empty answer scoring the
    lowest `null_score` of the windows (None: no window), after the texts of its score."""
    assert params.top_k is not None, "params must be resolved"
    best: list[tuple[float, tuple[int, int] | None]] = [
        (score, (s, e)) for score, s, e, _ in heapq.nsmallest(params.top_k, found, key=_rank)
    ]
    if params.handle_impossible_answer and null_score is not None:
        best.insert(sum(score >= null_score for score, _ in best), (null_score, None))
    return [
        answer_at(context, score, *span) if span is not None else Answer("", score, 0, 0, 0, 0)
        for score, span in best[: params.top_k]
    ]


def answer_at(context: str, score: float, char_start: int, char_end: int) -> Answer:
    """The answer context[char_start:char_end], with its UTF-8 byte offsets."""
    text = context[char_start:char_end]
    byte_start = len(context[:char_start].encode("utf-8"))
    return Answer(text, score, char_start, char_end, byte_start, byte_start + len(text.encode("utf-8")))


def _char_span(encoding: Any, s: int, e: int, context_index: int, align_to_words: bool) -> tuple[int, int]:
    """Character span of tokens s..e, widened to whole words when asked and the tokenizer knows words."""
    if align_to_words:
        start_word = encoding.token_to_word(s)
        end_word = encoding.token_to_word(e)
        if start_word is not None and end_word is not None:
            start_chars = encoding.word_to_chars(start_word, context_index)
            end_chars = encoding.word_to_chars(end_word, context_index)
            if start_chars is not None and end_chars is not None:
                return int(start_chars[0]), int(end_chars[1])
    offsets = encoding.offsets
    return int(offsets[s][0]), int(offsets[e][1])


def _softmax(logits: Logits) -> Logits:
    """Row-wise softmax in float32, as the pipeline computes it (numpy on the model's float32 logits)."""
    result: Logits = np.exp(logits - logits.max(axis=-1, keepdims=True))
    result /= result.sum(axis=-1, keepdims=True)
    return result


def _top_k(scores: Logits, k: int) -> npt.NDArray[np.intp]:
    """Per row, the indices of the k highest scores, highest first; equal scores in index order."""
    rows = np.arange(scores.shape[0])[:, None]
    if k < scores.shape[1]:
        candidates = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
    else:
        candidates = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.argsort(-scores[rows, candidates], axis=1, kind="stable")
    result: npt.NDArray[np.intp] = candidates[rows, order]
    return result
