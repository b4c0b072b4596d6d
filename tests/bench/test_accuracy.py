"""bench/accuracy on a SQuAD 2.0-style file: is_impossible kept, the official v2.0 script's HasAns/NoAns/overall."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.accuracy import score
from bench.evaldata import load_questions
from qaserve.config import EMBEDDED_MODEL

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION

ROOT = Path(__file__).resolve().parents[2]
RIVER = "The river flows into the lake near the old mill. The mill was built in 1820 by the miller's family."


def qa(qid: str, question: str, answers: list[str], context: str) -> dict[str, object]:
    """One question as SQuAD 2.0 writes it; without answers it is_impossible and keeps a plausible answer."""
    spans = [{"text": a, "answer_start": context.index(a)} for a in answers]
    entry: dict[str, object] = {"id": qid, "question": question, "answers": spans, "is_impossible": not answers}
    if not answers:
        entry["plausible_answers"] = [{"text": context.split()[0], "answer_start": 0}]
    return entry


@pytest.fixture
def v2_file(tmp_path: Path) -> Path:
    """Three answerable questions and two the contexts do not answer, in the SQuAD 2.0 layout."""
    document = {
        "version": "v2.0",
        "data": [
            {
                "title": "France",
                "paragraphs": [
                    {
                        "context": SEED_CONTEXT,
                        "qas": [
                            qa("paris", SEED_QUESTION, ["Paris", "Its capital is Paris"], SEED_CONTEXT),
                            qa("region", "Where is France?", ["Western Europe"], SEED_CONTEXT),
                            qa("mill-in-france", "When was the mill built?", [], SEED_CONTEXT),
                        ],
                    }
                ],
            },
            {
                "title": "River",
                "paragraphs": [
                    {
                        "context": RIVER,
                        "qas": [
                            qa("built", "When was the mill built?", ["1820", "in 1820"], RIVER),
                            qa("capital-at-river", SEED_QUESTION, [], RIVER),
                        ],
                    }
                ],
            },
        ],
    }
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_v2_questions_keep_is_impossible_and_have_no_gold_answers(v2_file: Path) -> None:
    questions = {q.id: q for q in load_questions(v2_file)}
    assert [q.is_impossible for q in questions.values()] == [False, False, True, False, True]
    assert questions["mill-in-france"].answers == ()  # its plausible answer is not a gold answer
    assert questions["built"].answers == ("1820", "in 1820")


def test_scores_follow_the_official_v2_script(v2_file: Path) -> None:
    questions = load_questions(v2_file)
    predictions = {
        "paris": "paris.",  # exact after normalising
        "region": "Europe",  # F1 2 * 1 * 0.5 / 1.5
        "mill-in-france": "",  # rightly no answer
        "built": "",  # wrongly no answer
        "capital-at-river": "the old mill",  # an answer where there is none
    }
    result = score(questions, predictions)
    assert (result.has_answer.questions, result.no_answer.questions, result.overall.questions) == (3, 2, 5)
    assert result.has_answer.exact_match == pytest.approx(100 / 3)
    assert result.has_answer.f1 == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert (result.no_answer.exact_match, result.no_answer.f1) == (50.0, 50.0)
    assert result.overall.exact_match == pytest.approx(40.0)
    assert result.overall.f1 == pytest.approx(100 * (1 + 2 / 3 + 1 + 0 + 0) / 5)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_accuracy_reports_v2_metrics_and_writes_predictions(v2_file: Path, tmp_path: Path, backend: str) -> None:
    """The embedded model through the command a user runs; unanswerable questions may be answered with ""."""
    predictions = tmp_path / "predictions.json"
    command = [sys.executable, "-m", "bench.accuracy", "--model", str(EMBEDDED_MODEL), "--backend", backend]
    done = subprocess.run(
        [*command, "--data", str(v2_file), "--predictions", str(predictions), "--concurrency", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answered = json.loads(predictions.read_text(encoding="utf-8"))
    assert set(answered) == {"paris", "region", "mill-in-france", "built", "capital-at-river"}
    assert answered["paris"] == "Paris"
    assert answered["capital-at-river"] == ""  # the no-answer score beats every span in the river text
    result = score(load_questions(v2_file), answered)
    printed = re.findall(r"(HasAns|NoAns) \((\d) questions\): EM ([\d.]+), F1 ([\d.]+)", done.stdout)
    assert printed == [
        (label, str(part.questions), f"{part.exact_match:.2f}", f"{part.f1:.2f}")
        for label, part in (("HasAns", result.has_answer), ("NoAns", result.no_answer))
    ]
    assert f"EM {result.overall.exact_match:.2f}, F1 {result.overall.f1:.2f}" in done.stdout
