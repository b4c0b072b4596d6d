"""SQuAD-style accuracy (official EM/F1) of qaserve's decoding, in process, for any model directory.

The embedded model's card gives its scores through the transformers 4.x question-answering pipeline
(SQuAD v1.1 dev: 58.42 EM / 70.58 F1); equal numbers with --backend torch mean qaserve decodes as the pipeline does.
--backend onnx scores the model directory's model.onnx through the same decoding. Data: bench/data (shipped).

    make accuracy                                  # SQuAD v1.1 dev, embedded model, torch fp32 (about 10 minutes)
    make accuracy ARGS="--backend onnx --limit 2000"
    make accuracy ARGS="--model DIR --data bench/data/xquad.en.json.gz"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.evaldata import SQUAD_DEV, load_questions
from qaserve.config import EMBEDDED_MODEL
from qaserve.qa import QARequest
from qaserve.runtime.spec import ModelsConfig, ModelSpec
from qaserve.server import build_engine


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


Question = tuple[str, str, tuple[str, ...]]  # question, context, gold answers


@dataclass(frozen=True)
class Score:
    exact_match: float
    f1: float
    questions: int
    seconds: float
    dtype: str  # what the loaded model reports: float32 for torch; int8 or float32 for onnx


async def evaluate(model_dir: Path, backend: str, questions: list[Question], concurrency: int) -> Score:
    models = ModelsConfig((ModelSpec("eval", str(model_dir), backend=backend, device="cpu"),), "eval")
    exact = f1_sum = 0.0
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(models, executor=executor)
        slots = asyncio.Semaphore(concurrency)

        async def one(question: str, context: str, golds: tuple[str, ...]) -> tuple[float, float]:
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
        dtype = engine.registry.info("eval").dtype
        await engine.registry.close()
    n = len(questions)
    return Score(100 * exact / n, 100 * f1_sum / n, n, time.perf_counter() - started, dtype)


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
    parser.add_argument("--data", type=Path, default=SQUAD_DEV, help="SQuAD-format file, .json or .json.gz")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    questions = [(q.question, q.context, q.answers) for q in load_questions(args.data)][: args.limit]
    score = asyncio.run(evaluate(args.model, args.backend, questions, args.concurrency))
    n, seconds = score.questions, score.seconds
    print(
        f"{args.data.name}: {n} questions, {args.model.name} --backend {args.backend} ({score.dtype}): "
        f"EM {score.exact_match:.2f}, F1 {score.f1:.2f}, {seconds:.0f} s ({n / seconds:.1f} questions/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
