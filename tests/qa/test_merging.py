"""Merging windows' candidates into answers: all at once (merge_candidates) and as windows are scored (RunningMerge)."""

from __future__ import annotations

import random

import pytest

from qaserve.qa import Answer, QAParams, RunningMerge, WindowCandidates, merge_candidates

# Words that come back in other cases, so windows find the same text (case-insensitively) at other offsets.
WORDS = ("Paris", "paris", "PARIS", "Lyon", "lyon", "Nice", "Zürich", "zürich", "Ålesund", "Kraków", "the river")


def span(context: str, text: str, score: float, occurrence: int = 0) -> tuple[float, int, int]:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(text, start + 1)
    return score, start, start + len(text)


def random_case(rng: random.Random, windows: int) -> tuple[str, list[WindowCandidates]]:
    """A context of repeated words and, per window, a few of its spans scored from a small set (equal scores) or at
    random, each window with its own no-answer score."""
    words = [rng.choice(WORDS) for _ in range(60)]
    context = " ".join(words)
    starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
    candidates = []
    for _ in range(windows):
        spans = []
        for _ in range(rng.randint(0, 6)):
            first = rng.randrange(len(words))
            last = min(len(words) - 1, first + rng.choice((0, 0, 0, 1)))
            score = rng.choice((0.5, 0.25, 0.125, rng.random()))
            spans.append((score, starts[first], starts[last] + len(words[last])))
        spans.sort(key=lambda s: s[0], reverse=True)
        candidates.append(WindowCandidates(spans, rng.choice((0.5, 0.25, rng.random()))))
    return context, candidates


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("handle_impossible_answer", [False, True])
def test_adding_windows_as_they_are_scored_answers_as_merging_them_all_at_once(
    seed: int, handle_impossible_answer: bool
) -> None:
    rng = random.Random(seed)
    context, candidates = random_case(rng, rng.randint(1, 30))
    params = QAParams(top_k=rng.choice((1, 2, 3, 5, 20)), handle_impossible_answer=handle_impossible_answer)
    order = list(range(len(candidates)))
    if seed % 3:  # windows finish out of order where several replicas run them
        rng.shuffle(order)
    merged = RunningMerge(context, params)
    added: list[int] = []
    while order:
        step = order[: rng.randint(1, 4)]  # a forward pass's windows
        order = order[len(step) :]
        for index in step:
            merged.add(index, candidates[index])
        added += step
        expected = merge_candidates(context, [candidates[i] for i in sorted(added)], params)
        assert merged.answers() == expected
        assert merged.windows == len(added)


def test_equal_scores_rank_in_the_order_the_texts_were_found_then_the_empty_answer() -> None:
    context = "Lyon and Paris, then Nice and paris."
    params = QAParams(top_k=4, handle_impossible_answer=True)
    windows = [
        WindowCandidates([span(context, "Nice", 0.25), span(context, "Lyon", 0.25)], null_score=0.5),
        WindowCandidates([span(context, "paris", 0.25), span(context, "Paris", 0.125)], null_score=0.25),
    ]

    expected = [
        Answer("paris", 0.375, 30, 35, 30, 35),  # both spans summed, the first one's offsets
        Answer("Nice", 0.25, 21, 25, 21, 25),
        Answer("Lyon", 0.25, 0, 4, 0, 4),
        Answer("", 0.25, 0, 0, 0, 0),  # the lowest no-answer score, after the texts that score as much
    ]
    assert merge_candidates(context, windows, params) == expected

    running = RunningMerge(context, params)
    running.add(1, windows[1])
    assert running.answers() == merge_candidates(context, [windows[1]], params)
    running.add(0, windows[0])
    assert running.answers() == expected
