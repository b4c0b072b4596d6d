"""The evaluation sets shipped in bench/data, and any SQuAD v1.1 or v2.0 file, as every bench script reads them."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
SQUAD_DEV = DATA / "squad-v1.1-dev.json.gz"
XQUAD_EN = DATA / "xquad.en.json.gz"


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # gold answer texts; none for a question the context does not answer
    is_impossible: bool = False  # SQuAD 2.0: the context holds no answer (the model should answer "")


def read_squad(path: Path) -> dict[str, Any]:
    """A SQuAD-format file, gzip-compressed (.gz) or plain JSON."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        document: dict[str, Any] = json.load(f)
    if not isinstance(document.get("data"), list):
        raise ValueError(f"{path}: not in the SQuAD format (no top-level 'data' list)")
    return document


def load_questions(path: Path) -> list[Question]:
    """Every question of a SQuAD-format file (v1.1 or v2.0), in file order, each with its own paragraph as context.
    A v2.0 question marked is_impossible keeps that mark and has no gold answers (its plausible_answers are not
    answers)."""
    return [
        _question(qa, paragraph)
        for article in read_squad(path)["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


@dataclass(frozen=True)
class ReaderQuestion:
    """A question with passages to read: its own paragraph, passages[gold], among others of the same article."""

    question: Question
    passages: tuple[str, ...]
    gold: int


def load_reader_questions(path: Path, passages: int, seed: int = 0) -> list[ReaderQuestion]:
    """Every question of a SQuAD-format file, in file order (as load_questions), with its own paragraph and up to
    `passages` - 1 other paragraphs of its article picked at random, in a random order; `seed` makes every run
    draw the same."""
    rng = random.Random(seed)
    result = []
    for article in read_squad(path)["data"]:
        contexts = [paragraph["context"] for paragraph in article["paragraphs"]]
        for index, paragraph in enumerate(article["paragraphs"]):
            others = contexts[:index] + contexts[index + 1 :]
            for qa in paragraph["qas"]:
                chosen = [*rng.sample(others, min(passages - 1, len(others))), paragraph["context"]]
                rng.shuffle(chosen)
                gold = chosen.index(paragraph["context"])
                result.append(ReaderQuestion(_question(qa, paragraph), tuple(chosen), gold))
    return result


def _question(qa: dict[str, Any], paragraph: dict[str, Any]) -> Question:
    return Question(
        qa["id"],
        qa["question"],
        paragraph["context"],
        () if qa.get("is_impossible") else tuple(a["text"] for a in qa["answers"]),
        bool(qa.get("is_impossible", False)),
    )
