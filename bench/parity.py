"""Answers of qaserve's decoding against the transformers 4.x question-answering pipeline, question by question.

transformers 5 has no QA pipeline, so the reference runs in a second virtual environment with transformers 4.57.6
(`make parity` builds .venv-hf4). Several parameter sets cover multi-window contexts, top_k, the impossible answer
and unaligned spans. Prints one line per set: questions, identical answer lists (text, start, end, order) and their
share, largest score difference among them. --backend torch must be 100% identical (exit 1 otherwise); --backend
onnx (the directory's model.onnx, int8 for the embedded model) reports its agreement with the pipeline.
Data: XQuAD English, shipped in bench/data.

    make parity
    make parity ARGS="--backend onnx --limit 100"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Top-level imports stay in the standard library: the reference side runs this file in the transformers 4.x
# environment, which has neither qaserve nor bench installed.
ROOT = Path(__file__).resolve().parents[1]
XQUAD = ROOT / "bench" / "data" / "xquad.en.json.gz"
PARAMETER_SETS: list[dict[str, Any]] = [
    {"top_k": 3},
    {"top_k": 5, "max_seq_len": 96, "doc_stride": 32},
    {"top_k": 2, "handle_impossible_answer": True},
    {"top_k": 3, "align_to_words": False, "max_answer_len": 8},
]


def questions(data: Path, limit: int) -> list[tuple[str, str]]:
    from bench.evaldata import load_questions

    return [(q.question, q.context) for q in load_questions(data)][:limit]


def reference(model: str) -> None:
    """Runs inside the transformers 4.x environment: reads [[question, context], ...] as JSON on stdin and prints
    the pipeline's answers as JSON."""
    import torch
    from transformers import pipeline

    asked = json.load(sys.stdin)
    qa = pipeline("question-answering", model=model, tokenizer=model, device=-1, torch_dtype=torch.float32)
    out = []
    for params in PARAMETER_SETS:
        answers = []
        for question, context in asked:
            result = qa(question=question, context=context, **params)
            answers.append(result if isinstance(result, list) else [result])
        out.append(answers)
    json.dump(out, sys.stdout)


async def ours(model: str, backend: str, asked: list[tuple[str, str]]) -> list[list[list[dict[str, Any]]]]:
    from qaserve.qa import QAParams, QARequest
    from qaserve.runtime import build_engine
    from qaserve.runtime.spec import ModelsConfig, ModelSpec

    models = ModelsConfig((ModelSpec("m", model, backend=backend, device="cpu"),), "m")
    out = []
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(models, executor=executor)
        for params in PARAMETER_SETS:
            results = await asyncio.gather(
                *(engine.answer(QARequest(q, c, params=QAParams(**params))) for q, c in asked)
            )
            out.append(
                [
                    [{"answer": a.answer, "score": a.score, "start": a.start, "end": a.end} for a in r.answers]
                    for r in results
                ]
            )
        await engine.registry.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "minilm-l6-squadshifts"))
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch: must match the pipeline exactly; onnx: the directory's model.onnx, agreement reported",
    )
    parser.add_argument("--data", type=Path, default=XQUAD, help="SQuAD-format file, .json or .json.gz")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--reference-python", help="python of a transformers 4.x environment")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(args.model)
        return 0
    if not args.reference_python:
        parser.error("--reference-python is required (make parity sets it up)")
    asked = questions(args.data, args.limit)
    command = [args.reference_python, str(Path(__file__)), "--reference", "--model", args.model]
    done = subprocess.run(command, input=json.dumps(asked), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"the reference pipeline failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return 1
    expected = json.loads(done.stdout)
    got = asyncio.run(ours(args.model, args.backend, asked))
    print(f"{args.data.name}, {Path(args.model).name} --backend {args.backend} against the transformers 4.x pipeline:")
    total = identical = 0
    for params, want, have in zip(PARAMETER_SETS, expected, got, strict=True):
        same = 0
        worst = 0.0
        for w, h in zip(want, have, strict=True):
            if [(a["answer"], a["start"], a["end"]) for a in w] == [(a["answer"], a["start"], a["end"]) for a in h]:
                same += 1
                worst = max([worst, *(abs(a["score"] - b["score"]) for a, b in zip(w, h, strict=True))])
        total += len(want)
        identical += same
        print(
            f"{json.dumps(params)}: {len(want)} questions, {same} identical answer lists "
            f"({100 * same / len(want):.1f}%), max |score diff| among them {worst:.2e}"
        )
    print(f"overall: {identical}/{total} identical answer lists ({100 * identical / total:.1f}%)")
    # torch must reproduce the pipeline; int8 weights move some spans, which is what the percentage reports.
    return 1 if args.backend == "torch" and identical != total else 0


if __name__ == "__main__":
    sys.exit(main())
