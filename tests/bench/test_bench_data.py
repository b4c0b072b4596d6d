"""The evaluation sets ship in bench/data and load as the bench scripts read them, with no sibling folders."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from bench.evaldata import SQUAD_DEV, XQUAD_EN, load_questions, read_squad
from bench.load import select_workload

README = SQUAD_DEV.parent / "README.md"


@pytest.mark.parametrize(
    ("path", "questions", "paragraphs"), [(SQUAD_DEV, 10_570, 2_067), (XQUAD_EN, 1_190, 240)], ids=lambda v: str(v)
)
def test_shipped_set_loads_with_its_counts(path: Path, questions: int, paragraphs: int) -> None:
    assert path.is_relative_to(Path(__file__).resolve().parents[2] / "bench" / "data")
    document = read_squad(path)
    assert sum(len(article["paragraphs"]) for article in document["data"]) == paragraphs
    loaded = load_questions(path)
    assert len(loaded) == questions
    assert len({q.id for q in loaded}) == questions
    assert all(q.answers and all(answer in q.context for answer in q.answers) for q in loaded)


@pytest.mark.parametrize("path", [SQUAD_DEV, XQUAD_EN], ids=lambda p: p.name)
def test_shipped_set_is_the_attributed_source(path: Path) -> None:
    """The README's checksum is that of the uncompressed file, and it names the licence."""
    readme = README.read_text()
    assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() in readme
    assert "CC BY-SA 4.0" in readme
    assert path.name in readme


def test_bench_workload_is_every_35th_question_with_its_own_paragraph() -> None:
    questions = load_questions(SQUAD_DEV)
    workload = select_workload(questions, stride=35, limit=None)
    assert len(workload) == 302
    assert workload[0] == (questions[0].question, questions[0].context)
    assert workload[-1] == (questions[35 * 301].question, questions[35 * 301].context)
    assert select_workload(questions, stride=35, limit=40) == workload[:40]


def test_plain_json_reads_too_and_other_json_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "one.json"
    qa = {"id": "x", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 0}]}
    plain.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "Paris.", "qas": [qa]}]}]}))
    assert [q.answers for q in load_questions(plain)] == [("Paris",)]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="SQuAD format"):
        load_questions(other)
