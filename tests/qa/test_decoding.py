"""Span decoding against hand-built logits, with the real WordPiece tokenizer of the embedded model."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from qaserve.qa import QAParams, Windows, decode_answers, split_into_windows
from qaserve.qa.windowing import resolve_params

HIGH = 8.0


def windows_for(tokenizer: Any, question: str, context: str, **params: Any) -> tuple[Windows, QAParams]:
    resolved = resolve_params(QAParams(**params), model_max_len=512)
    return split_into_windows(tokenizer, question, context, resolved), resolved


def token_at(windows: Windows, window: int, char: int) -> int:
    """Index of the context token of `window` whose span starts at character `char`."""
    enc = windows.encodings[window]
    for i, (seq, (start, _)) in enumerate(zip(enc.sequence_ids, enc.offsets, strict=True)):
        if seq == windows.context_index and start == char:
            return i
    raise AssertionError(f"no token starts at {char} in window {window}")


def zero_logits(windows: Windows) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(ids) for ids in windows.input_ids)
    return np.zeros((len(windows), width), dtype=np.float32), np.zeros((len(windows), width), dtype=np.float32)


def softmax_prob(logit: float, others: int) -> float:
    """Probability of one token with `logit` among `others` tokens of logit 0."""
    return math.exp(logit) / (math.exp(logit) + others)


def answer_tokens(windows: Windows, window: int) -> int:
    return sum(windows.answer_masks[window])


def test_single_span_score_and_offsets(tokenizer: Any) -> None:
    context = "France is a country in Western Europe. Its capital is Paris."
    windows, params = windows_for(tokenizer, "What is the capital of France?", context)
    start, end = zero_logits(windows)
    paris = token_at(windows, 0, 54)
    start[0, paris] = HIGH
    end[0, paris] = HIGH

    [best] = decode_answers(context, windows, start, end, params)

    n = answer_tokens(windows, 0)  # context tokens + CLS share the softmax
    expected = softmax_prob(HIGH, n - 1) ** 2
    assert (best.answer, best.start, best.end) == ("Paris", 54, 59)
    assert (best.byte_start, best.byte_end) == (54, 59)
    assert best.score == pytest.approx(expected, rel=1e-5)


def test_question_tokens_never_answer(tokenizer: Any) -> None:
    context = "Its capital is Paris."
    windows, params = windows_for(tokenizer, "capital capital capital", context)
    start, end = zero_logits(windows)
    start[0, 1:4] = 50.0  # the question's tokens
    end[0, 1:4] = 50.0
    answers = decode_answers(context, windows, start, end, params.__class__(**{**params.__dict__, "top_k": 5}))
    assert answers
    for a in answers:
        assert context[a.start : a.end] == a.answer
        assert a.start >= 0 and a.end <= len(context)


def test_max_answer_len_is_inclusive_bound(tokenizer: Any) -> None:
    context = "one two three four five six seven eight nine ten"
    windows, params = windows_for(tokenizer, "count?", context, max_answer_len=3)
    start, end = zero_logits(windows)
    two, four, five = token_at(windows, 0, 4), token_at(windows, 0, 14), token_at(windows, 0, 19)
    start[0, two] = HIGH
    end[0, four] = HIGH  # "two three four": exactly 3 tokens, allowed
    end[0, five] = HIGH - 0.5  # "two ... five": 4 tokens, over the limit
    [best] = decode_answers(context, windows, start, end, params)
    assert best.answer == "two three four"

    windows, shorter = windows_for(tokenizer, "count?", context, max_answer_len=2)
    [best] = decode_answers(context, windows, start, end, shorter)
    assert best.answer != "two three four"
    assert len(best.answer.split()) <= 2


def test_cls_is_never_a_span_but_scores_the_impossible_answer(tokenizer: Any) -> None:
    context = "Its capital is Paris."
    windows, params = windows_for(tokenizer, "What is the capital?", context)
    start, end = zero_logits(windows)
    start[0, 0] = end[0, 0] = 20.0  # CLS: the model says "no answer"
    paris = token_at(windows, 0, 15)
    start[0, paris] = end[0, paris] = 2.0

    [best] = decode_answers(context, windows, start, end, params)
    assert best.answer != ""  # CLS excluded from spans

    with_null = QAParams(**{**params.__dict__, "handle_impossible_answer": True, "top_k": 2})
    first, second = decode_answers(context, windows, start, end, with_null)
    n = answer_tokens(windows, 0)
    p_cls = math.exp(20.0) / (math.exp(20.0) + math.exp(2.0) + (n - 2))
    assert (first.answer, first.start, first.end) == ("", 0, 0)
    assert first.score == pytest.approx(p_cls * p_cls, rel=1e-5)
    assert second.answer == "Paris"


def test_impossible_answer_takes_the_lowest_cls_score_over_windows(tokenizer: Any) -> None:
    context = " ".join(f"word{i}" for i in range(120))
    windows, params = windows_for(
        tokenizer, "which?", context, max_seq_len=64, doc_stride=16, handle_impossible_answer=True, top_k=20
    )
    assert len(windows) >= 3
    start, end = zero_logits(windows)
    for w, logit in enumerate([9.0, 3.0] + [6.0] * (len(windows) - 2)):
        start[w, 0] = end[w, 0] = logit
    answers = decode_answers(context, windows, start, end, params)
    null = next(a for a in answers if a.answer == "")
    n = answer_tokens(windows, 1)
    p = math.exp(3.0) / (math.exp(3.0) + n - 1)
    assert null.score == pytest.approx(p * p, rel=1e-5)


def test_windows_that_agree_add_their_scores(tokenizer: Any) -> None:
    context = " ".join(f"w{i}" for i in range(60)) + " Paris " + " ".join(f"v{i}" for i in range(60))
    windows, params = windows_for(tokenizer, "where?", context, max_seq_len=64, doc_stride=30)
    char = context.index("Paris")
    holders = [w for w in range(len(windows)) if any(s == char for s, _ in windows.encodings[w].offsets)]
    assert len(holders) >= 2, "the overlap must put the answer in two windows"
    start, end = zero_logits(windows)
    expected = 0.0
    for w in holders:
        t = token_at(windows, w, char)
        start[w, t] = end[w, t] = HIGH
        expected += softmax_prob(HIGH, answer_tokens(windows, w) - 1) ** 2

    [best] = decode_answers(context, windows, start, end, params)
    assert (best.answer, best.start) == ("Paris", char)
    assert best.score == pytest.approx(expected, rel=1e-5)


def test_top_k_returns_k_answers_best_first(tokenizer: Any) -> None:
    context = "alpha beta gamma delta epsilon zeta eta theta"
    # one-token answers only, so cross-word spans do not compete
    windows, params = windows_for(tokenizer, "which?", context, top_k=4, max_answer_len=1)
    start, end = zero_logits(windows)
    for word, logit in [("beta", 6.0), ("delta", 5.0), ("zeta", 4.0), ("theta", 3.0)]:
        t = token_at(windows, 0, context.index(word))
        start[0, t] = end[0, t] = logit
    answers = decode_answers(context, windows, start, end, params)
    assert [a.answer for a in answers] == ["beta", "delta", "zeta", "theta"]
    assert [a.score for a in answers] == sorted((a.score for a in answers), reverse=True)


def test_align_to_words_widens_a_subword_span(tokenizer: Any) -> None:
    context = "The unbelievableness of it all."
    word_start = context.index("unbelievableness")
    windows, params = windows_for(tokenizer, "what?", context)
    enc = windows.encodings[0]
    pieces = [i for i, (s, e) in enumerate(enc.offsets) if word_start <= s < word_start + 16 and e > s]
    assert len(pieces) >= 2, "the word must be split into word pieces"
    middle = pieces[1]
    start, end = zero_logits(windows)
    start[0, middle] = end[0, middle] = HIGH

    [aligned] = decode_answers(context, windows, start, end, params)
    assert aligned.answer == "unbelievableness"

    raw = QAParams(**{**params.__dict__, "align_to_words": False})
    [piece] = decode_answers(context, windows, start, end, raw)
    s, e = enc.offsets[middle]
    assert (piece.start, piece.end, piece.answer) == (s, e, context[s:e])
    assert piece.answer != "unbelievableness"


def test_non_ascii_context_gives_code_point_and_byte_offsets(tokenizer: Any) -> None:
    context = "Café 😀 au lait: the drink of Zürich."
    windows, params = windows_for(tokenizer, "Which city?", context)
    char = context.index("Zürich")
    start, end = zero_logits(windows)
    t = token_at(windows, 0, char)
    start[0, t] = end[0, t] = HIGH

    [best] = decode_answers(context, windows, start, end, params)
    raw = context.encode("utf-8")
    assert best.answer == "Zürich" == context[best.start : best.end]
    assert raw[best.byte_start : best.byte_end].decode("utf-8") == "Zürich"
    assert best.byte_start != best.start  # é and 😀 take more bytes than code points
    assert best.byte_end - best.byte_start == len("Zürich".encode())
