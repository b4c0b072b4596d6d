"""The evaluation sets shipped in bench/data (SQuAD JSON format, gzip-compressed), read by every bench script."""

from __future__ import annotations

import gzip
import json
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
    answers: tuple[str, ...]  # gold answer texts


def read_squad(path: Path) -> dict[str, Any]:
    """A SQuAD-format file, gzip-compressed (.gz) or plain JSON."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        document: dict[str, Any] = json.load(f)
    if not isinstance(document.get("data"), list):
        raise ValueError(f"{path}: not in the SQuAD format (no top-level 'data' list)")
    return document


def load_questions(path: Path) -> list[Question]:
    """Every question of a SQuAD-format file, in file order, each with its own paragraph as context."""
    return [
        Question(qa["id"], qa["question"], paragraph["context"], tuple(a["text"] for a in qa["answers"]))
        for article in read_squad(path)["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
