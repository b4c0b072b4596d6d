"""Answers of qaserve's decoding against the transformers 4.x question-answering pipeline, question by question.

transformers 5 has no QA pipeline, so the reference runs in a second virtual environment with transformers 4.57.6
(`make parity` builds .venv-hf4). Several parameter sets cover multi-window contexts, top_k, the impossible answer
and unaligned spans. Prints one line per set: questions, identical answer lists, largest score difference.

    make parity
    .venv/bin/python -m bench.parity --reference-python .venv-hf4/bin/python --limit 100
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

ROOT = Path(__file__).resolve().parents[1]
XQUAD = ROOT.parent / "shared" / "data" / "xquad.en.json"
PARAMETER_SETS: list[dict[str, Any]] = [
    {"top_k": 3},
    {"top_k": 5, "max_seq_len": 96, "doc_stride": 32},
    {"top_k": 2, "handle_impossible_answer": True},
    {"top_k": 3, "align_to_words": False, "max_answer_len": 8},
]


def questions(data: Path, limit: int) -> list[tuple[str, str]]:
    found = [
        (qa["question"], p["context"])
        for article in json.loads(data.read_text())["data"]
        for p in article["paragraphs"]
        for qa in p["qas"]
    ]
    return found[:limit]


def reference(model: str, data: Path, limit: int) -> None:
    """Runs inside the transformers 4.x environment: prints the pipeline's answers as JSON."""
    import torch
    from transformers import pipeline

    qa = pipeline("question-answering", model=model, tokenizer=model, device=-1, torch_dtype=torch.float32)
    out = []
    for params in PARAMETER_SETS:
        answers = []
        for question, context in questions(data, limit):
            result = qa(question=question, context=context, **params)
            answers.append(result if isinstance(result, list) else [result])
        out.append(answers)
    json.dump(out, sys.stdout)


async def ours(model: str, data: Path, limit: int) -> list[list[list[dict[str, Any]]]]:
    from qaserve.qa import QAParams, QARequest
    from qaserve.runtime.spec import ModelsConfig, ModelSpec
    from qaserve.server import build_engine

    out = []
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(ModelsConfig((ModelSpec("m", model, device="cpu"),), "m"), executor=executor)
        for params in PARAMETER_SETS:
            results = await asyncio.gather(
                *(engine.answer(QARequest(q, c, params=QAParams(**params))) for q, c in questions(data, limit))
            )
            out.append(
                [
                    [{"answer": a.answer, "score": a.score, "start": a.start, "end": a.end} for a in r.answers]
                    for r in results
                ]
            )
        await engine.registry.close()
    return out


def _answer(a: Any) -> dict[str, Any]:
    return {"answer": a.answer, "score": a.score, "start": a.start, "end": a.end}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "minilm-l6-squadshifts"))
    parser.add_argument("--data", type=Path, default=XQUAD)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--reference-python", help="python of a transformers 4.x environment")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(args.model, args.data, args.limit)
        return 0
    if not args.reference_python:
        parser.error("--reference-python is required (make parity sets it up)")
    command = [args.reference_python, str(Path(__file__)), "--reference", "--model", args.model]
    command += ["--data", str(args.data), "--limit", str(args.limit)]
    expected = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    got = asyncio.run(ours(args.model, args.data, args.limit))
    failed = False
    for params, want, have in zip(PARAMETER_SETS, expected, got, strict=True):
        same = worst = 0.0
        for w, h in zip(want, have, strict=True):
            if [(a["answer"], a["start"], a["end"]) for a in w] == [(a["answer"], a["start"], a["end"]) for a in h]:
                same += 1
                worst = max([worst, *(abs(a["score"] - b["score"]) for a, b in zip(w, h, strict=True))])
        failed |= same != len(want)
        print(f"{json.dumps(params)}: {len(want)} questions, {int(same)} identical answer lists, ", end="")
        print(f"max |score diff| {worst:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
