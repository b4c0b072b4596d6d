"""SQuAD-style accuracy (official EM/F1) of qaserve's decoding, in process, for any model directory.

The embedded model's card gives its scores through the transformers 4.x question-answering pipeline
(SQuAD v1.1 dev: 58.42 EM / 70.58 F1); equal numbers here mean qaserve decodes as the pipeline does.

    make accuracy                                  # SQuAD v1.1 dev, embedded model (about 10 minutes on 2 cores)
    make accuracy ARGS="--data ../shared/data/xquad.en.json"
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qaserve.config import EMBEDDED_MODEL
from qaserve.qa import QARequest
from qaserve.runtime.spec import ModelsConfig, ModelSpec
from qaserve.server import build_engine

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad-v1.1-dev.json"


def normalize(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


Question = tuple[str, str, list[str]]  # question, context, gold answers


def load_questions(data: Path, limit: int | None) -> list[Question]:
    return [
        (qa["question"], paragraph["context"], [a["text"] for a in qa["answers"]])
        for article in json.loads(data.read_text())["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ][:limit]


async def evaluate(model_dir: Path, questions: list[Question], concurrency: int) -> tuple[float, float, int, float]:
    models = ModelsConfig((ModelSpec("eval", str(model_dir), device="cpu"),), "eval")
    exact = f1_sum = 0.0
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(models, executor=executor)
        slots = asyncio.Semaphore(concurrency)

        async def one(question: str, context: str, golds: list[str]) -> tuple[float, float]:
            async with slots:
                result = await engine.answer(QARequest(question, context))
            predicted = result.answers[0].answer
            return (
                max(float(normalize(predicted) == normalize(g)) for g in golds),
                max(f1(predicted, g) for g in golds),
            )

        for em, f in await asyncio.gather(*(one(*q) for q in questions)):
            exact += em
            f1_sum += f
        await engine.registry.close()
    n = len(questions)
    return 100 * exact / n, 100 * f1_sum / n, n, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--data", type=Path, default=SQUAD)
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    questions = load_questions(args.data, args.limit)
    em, f, n, seconds = asyncio.run(evaluate(args.model, questions, args.concurrency))
    print(f"{args.data.name}: {n} questions, EM {em:.2f}, F1 {f:.2f}, {seconds:.0f} s ({n / seconds:.1f} questions/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
