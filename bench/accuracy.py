"""SQuAD-style accuracy (official EM/F1) of qaserve's decoding, in process, for any model directory.

The embedded model's card gives its scores through the transformers 4.x question-answering pipeline
(SQuAD v1.1 dev: 58.42 EM / 70.58 F1); equal numbers with --backend torch mean qaserve decodes as the pipeline does.
--backend onnx scores the model directory's model.onnx through the same decoding. Data: bench/data (shipped), or
any SQuAD v1.1 or v2.0 file. A v2.0 file (questions marked is_impossible) is scored as the official v2.0 script
scores it: the model may answer "" (the pipeline's handle_impossible_answer decides), and HasAns, NoAns and overall
EM/F1 are reported.

    make accuracy                                  # SQuAD v1.1 dev, embedded model, torch fp32 (about 10 minutes)
    make accuracy ARGS="--backend onnx --limit 2000"
    make accuracy ARGS="--model DIR --data bench/data/xquad.en.json.gz"
    make accuracy ARGS="--model DIR --data dev-v2.0.json --predictions predictions.json"

With --passages N (N > 1) it measures the reader: each question is read (engine.read, as the Read RPC) over its own
paragraph and up to N - 1 other paragraphs of the same article, shuffled, and its top-1 answer scored, in both score
modes; the first row answers the same questions from their own paragraph alone (Answer), the upper bound.

    make accuracy ARGS="--passages 10 --limit 300"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import string
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.evaldata import SQUAD_DEV, Question, load_questions, load_reader_questions
from qaserve.config import EMBEDDED_MODEL
from qaserve.qa import Passage, QAParams, QARequest, ReadParams, ReadRequest, ScoreMode
from qaserve.runtime import QAEngine, build_engine
from qaserve.runtime.spec import ModelsConfig, ModelSpec


def normalize(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    """Token F1 as the official v2.0 script has it: where either side is empty after normalising, 1 if both are."""
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def marks(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the gold answers that are not empty once normalised, or
    against "" where there are none (a question without an answer, rightly answered with "")."""
    golds = [g for g in golds if normalize(g)] or [""]
    return max(float(normalize(prediction) == normalize(g)) for g in golds), max(f1(prediction, g) for g in golds)


@dataclass(frozen=True)
class Marks:
    """EM and F1 in percent over a set of questions."""

    exact_match: float
    f1: float
    questions: int


@dataclass(frozen=True)
class Score:
    overall: Marks
    has_answer: Marks  # the questions with gold answers (the official script's HasAns)
    no_answer: Marks  # the is_impossible questions (NoAns)
    seconds: float
    dtype: str  # what the loaded model reports: float32 for torch; int8 or float32 for onnx


def score(questions: Sequence[Question], predictions: dict[str, str], seconds: float = 0.0, dtype: str = "") -> Score:
    """The official SQuAD v2.0 script's exact/f1, HasAns_* and NoAns_* (without a no-answer probability file)."""
    by_id = {q.id: marks(predictions[q.id], q.answers) for q in questions}

    def over(selected: list[Question]) -> Marks:
        n = len(selected)
        if n == 0:
            return Marks(0.0, 0.0, 0)
        return Marks(
            100 * sum(by_id[q.id][0] for q in selected) / n, 100 * sum(by_id[q.id][1] for q in selected) / n, n
        )

    return Score(
        over(list(questions)),
        over([q for q in questions if q.answers]),
        over([q for q in questions if not q.answers]),
        seconds,
        dtype,
    )


Ask = Callable[[QAEngine, Question], Awaitable[str]]
"""How one question gets its best answer from the engine."""


def answer_own_paragraph(questions: Sequence[Question]) -> Ask:
    """Answer on the question's own paragraph. Where some question has no answer (a v2.0 file), the pipeline's
    handle_impossible_answer may choose "" over every span."""
    params = QAParams(handle_impossible_answer=any(q.is_impossible for q in questions))

    async def ask(engine: QAEngine, question: Question) -> str:
        result = await engine.answer(QARequest(question.question, question.context, params=params))
        return result.answers[0].answer

    return ask


def read_passages(passages: Mapping[str, tuple[str, ...]], mode: ScoreMode) -> Ask:
    """Read over the question's passages (by question id) in score mode `mode`; "" when no answer comes back."""

    async def ask(engine: QAEngine, question: Question) -> str:
        request = ReadRequest(
            question.question, tuple(Passage(p) for p in passages[question.id]), read=ReadParams(score_mode=mode)
        )
        result = await engine.read(request)
        return result.answers[0].answer if result.answers else ""

    return ask


async def predict(
    model_dir: Path, backend: str, questions: Sequence[Question], concurrency: int, ask: Ask | None = None
) -> tuple[dict[str, str], str]:
    """Each question's best answer, by id (by `ask`, default answer_own_paragraph), and the dtype the model
    reports."""
    models = ModelsConfig((ModelSpec("eval", str(model_dir), backend=backend, device="cpu"),), "eval")
    ask = ask if ask is not None else answer_own_paragraph(questions)
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(models, executor=executor)
        slots = asyncio.Semaphore(concurrency)

        async def one(question: Question) -> str:
            async with slots:
                return await ask(engine, question)

        answers = await asyncio.gather(*(one(q) for q in questions))
        dtype = engine.registry.info("eval").dtype
        await engine.registry.close()
    return {q.id: answer for q, answer in zip(questions, answers, strict=True)}, dtype


def report(name: str, model: str, backend: str, result: Score) -> str:
    n, seconds = result.overall.questions, result.seconds
    overall = result.overall
    line = (
        f"{name}: {n} questions, {model} --backend {backend} ({result.dtype}): "
        f"EM {overall.exact_match:.2f}, F1 {overall.f1:.2f}, {seconds:.0f} s ({n / max(seconds, 1e-9):.1f} questions/s)"
    )
    if result.no_answer.questions:
        line += "".join(
            f"\n  {label} ({part.questions} questions): EM {part.exact_match:.2f}, F1 {part.f1:.2f}"
            for label, part in (("HasAns", result.has_answer), ("NoAns", result.no_answer))
        )
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=EMBEDDED_MODEL, help="model directory (default: the embedded model)"
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx", "auto"),
        default="torch",
        help="torch (fp32, the pipeline's numbers), onnx (the directory's model.onnx), or auto as the server picks",
    )
    parser.add_argument("--data", type=Path, default=SQUAD_DEV, help="SQuAD v1.1 or v2.0 file, .json or .json.gz")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--predictions", type=Path, help='also write {"question id": "answer"} here, the official scripts\' input'
    )
    parser.add_argument(
        "--passages",
        type=int,
        default=1,
        help="N > 1: read each question over its paragraph and up to N - 1 others of its article (both score modes)",
    )
    parser.add_argument("--seed", type=int, default=0, help="--passages: seed of the paragraphs drawn and their order")
    args = parser.parse_args()
    if args.passages > 1:
        return reader_table(args)
    questions = load_questions(args.data)[: args.limit]
    started = time.perf_counter()
    predictions, dtype = asyncio.run(predict(args.model, args.backend, questions, args.concurrency))
    if args.predictions is not None:
        args.predictions.write_text(json.dumps(predictions, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    result = score(questions, predictions, time.perf_counter() - started, dtype)
    print(report(args.data.name, args.model.name, args.backend, result))
    return 0


def reader_table(args: argparse.Namespace) -> int:
    """--passages: top-1 EM/F1 of the reader in both score modes, and of Answer on the gold paragraph alone."""
    sets = load_reader_questions(args.data, args.passages, args.seed)[: args.limit]
    questions = [s.question for s in sets]
    passages = {s.question.id: s.passages for s in sets}
    average = sum(len(s.passages) for s in sets) / max(1, len(sets))
    runs: list[tuple[str, Ask | None]] = [
        ("Answer, own paragraph only", None),
        (f"Read, calibrated, {average:.1f} passages", read_passages(passages, ScoreMode.CALIBRATED)),
        (f"Read, pipeline, {average:.1f} passages", read_passages(passages, ScoreMode.PIPELINE)),
    ]
    lines = ["| mode | EM | F1 | questions/s |", "|---|---|---|---|"]
    for label, ask in runs:
        started = time.perf_counter()
        predictions, dtype = asyncio.run(predict(args.model, args.backend, questions, args.concurrency, ask))
        result = score(questions, predictions, time.perf_counter() - started, dtype)
        rate = result.overall.questions / max(result.seconds, 1e-9)
        lines.append(f"| {label} | {result.overall.exact_match:.2f} | {result.overall.f1:.2f} | {rate:.1f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    print(
        f"{args.data.name}: {len(sets)} questions, {args.model.name} --backend {args.backend} ({dtype}), "
        f"top-1 answers, seed {args.seed}"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
