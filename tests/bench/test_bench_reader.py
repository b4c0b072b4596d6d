"""The reader's benches: the multi-passage question sets, make accuracy --passages, and make bench-reader."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import reader
from bench.accuracy import predict, read_passages
from bench.evaldata import SQUAD_DEV, load_questions, load_reader_questions, read_squad
from qaserve.config import EMBEDDED_MODEL
from qaserve.qa import ScoreMode

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION

ROOT = Path(__file__).resolve().parents[2]
PARAGRAPHS = [
    SEED_CONTEXT,
    "The river flows into the lake near the old mill. The mill was built in 1820 by the miller's family.",
    "Germany is a country in Central Europe. Its capital is Berlin, its largest city.",
    "The Loire is the longest river of France; it flows into the Atlantic Ocean.",
]


@pytest.fixture
def article_file(tmp_path: Path) -> Path:
    """One article of four paragraphs; a question on the first and one on the second."""
    questions = {
        0: {"id": "paris", "question": SEED_QUESTION, "answers": [{"text": "Paris", "answer_start": 54}]},
        1: {"id": "mill", "question": "When was the mill built?", "answers": [{"text": "1820", "answer_start": 71}]},
    }
    paragraphs = [
        {"context": text, "qas": [questions[i]] if i in questions else []} for i, text in enumerate(PARAGRAPHS)
    ]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}), encoding="utf-8")
    return path


def test_each_question_gets_its_paragraph_among_others_of_its_article() -> None:
    sets = load_reader_questions(SQUAD_DEV, 10)
    assert [s.question.id for s in sets] == [q.id for q in load_questions(SQUAD_DEV)]
    article_of = {p["context"]: a["title"] for a in read_squad(SQUAD_DEV)["data"] for p in a["paragraphs"]}
    golds = set()
    for s in sets[:500]:
        assert len(s.passages) == 10
        assert s.passages[s.gold] == s.question.context
        assert {article_of[p] for p in s.passages} == {article_of[s.question.context]}
        golds.add(s.gold)
    assert len(golds) == 10  # shuffled: the own paragraph lands anywhere
    assert load_reader_questions(SQUAD_DEV, 10)[:50] == sets[:50]  # the same draw every run
    assert load_reader_questions(SQUAD_DEV, 10, seed=1)[:50] != sets[:50]


def test_a_small_article_gives_every_paragraph(article_file: Path) -> None:
    sets = load_reader_questions(article_file, 10)
    assert [sorted(s.passages) for s in sets] == [sorted(PARAGRAPHS)] * 2


def test_the_reader_answers_each_question_from_its_passages(article_file: Path) -> None:
    sets = load_reader_questions(article_file, 4)
    questions = [s.question for s in sets]
    passages = {s.question.id: s.passages for s in sets}
    for mode in ScoreMode:
        predictions, _ = asyncio.run(predict(EMBEDDED_MODEL, "onnx", questions, 2, read_passages(passages, mode)))
        assert set(predictions) == {"paris", "mill"}
        for question_id, answer in predictions.items():
            assert answer and any(answer in passage for passage in passages[question_id]), mode


def test_accuracy_prints_the_reader_table(article_file: Path) -> None:
    command = [sys.executable, "-m", "bench.accuracy", "--backend", "onnx", "--data", str(article_file)]
    done = subprocess.run(
        [*command, "--passages", "3", "--concurrency", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert rows == ["Answer, own paragraph only", "Read, calibrated, 3.0 passages", "Read, pipeline, 3.0 passages"]


def test_bench_reader_runs_both_ways_end_to_end(
    tiny_model_dir: Path, article_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tiny_model_dir), "--data", str(article_file), "--stride", "1"]
    assert reader.main([*argv, "--seconds", "0.3", "--warmup", "0", "--concurrency", "1", "2"]) == 0

    lines = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [(cells[1].strip(), cells[2].strip()) for cells in lines[1:]] == [
        ("read", "1"),
        ("fan-out", "1"),
        ("read", "2"),
        ("fan-out", "2"),
    ]
    assert all(cells[8].strip() == "0" for cells in lines[1:])  # no errors
    assert all(float(cells[3]) > 0 for cells in lines[1:])


def test_each_read_row_is_compared_with_the_fan_out_measured_with_it() -> None:
    rows = [
        reader.Row("read", 8, 2.0, 100.0, 150.0, Counter()),
        reader.Row("fan-out", 8, 1.0, 200.0, 300.0, Counter()),
        reader.Row("read", 8, 3.0, 100.0, 150.0, Counter({"UNAVAILABLE": 2})),
        reader.Row("fan-out", 8, 4.0, 50.0, 80.0, Counter()),
    ]
    cells = [line.split("|")[6:9] for line in reader.table(rows)[2:]]
    assert [[c.strip() for c in row] for row in cells] == [
        ["2.00x", "0.50x", "0"],
        ["1.00x", "1.00x", "0"],
        ["0.75x", "2.00x", "UNAVAILABLE 2"],
        ["1.00x", "1.00x", "0"],
    ]
