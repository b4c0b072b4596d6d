"""The bare model, `make bench`'s baseline: plain transformers + torch, or ONNX Runtime, one question at a time.

This is what a user would write without qaserve. bench.load runs it as its own process, with the default environment
(no OMP_*/MKL_*/QASERVE_* variables), and it imports nothing from qaserve nor from bench: only the framework it
measures, transformers for the tokenizer, numpy and the standard library. Each question is tokenized (only_second
truncation, max_length 384, stride 128, overflowing windows kept, no padding) and run through the model; answers
are not decoded, so the model call itself is the baseline. Prints one JSON object on stdout.

    python -P bench/bare.py --backend torch --model models/minilm-l6-squadshifts --workload W.json --seconds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

MAX_LENGTH = 384
STRIDE = 128


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; bench.load imports it, so the baseline and the server rows share one definition."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def torch_runner(model_dir: str, tokenizer: Any) -> tuple[Callable[[str, str], object], dict[str, Any]]:
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = tokenizer.model_input_names

    def run(question: str, context: str) -> object:
        encoding = tokenize(tokenizer, question, context)
        with torch.inference_mode():
            if len(encoding["input_ids"]) == 1:
                inputs = {name: torch.tensor(encoding[name]) for name in names}
            else:
                inputs = tokenizer.pad({name: encoding[name] for name in names}, return_tensors="pt")
            output = model(**inputs)
        return output.start_logits, output.end_logits

    return run, {"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads()}


def onnx_runner(model_dir: str, tokenizer: Any) -> tuple[Callable[[str, str], object], dict[str, Any]]:
    import numpy as np
    import onnxruntime

    # Default SessionOptions: what `InferenceSession(path)` gives a user on a CPU machine.
    session = onnxruntime.InferenceSession(f"{model_dir}/model.onnx", providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(question: str, context: str) -> object:
        encoding = tokenize(tokenizer, question, context)
        if len(encoding["input_ids"]) == 1:
            batch = {name: encoding[name] for name in names if name in encoding}
        else:
            batch = tokenizer.pad({name: encoding[name] for name in names if name in encoding}, return_tensors="np")
        feed = {name: np.asarray(value, dtype=np.int64) for name, value in batch.items()}
        for name in names:  # a graph that takes token_type_ids from a tokenizer that gives none
            if name not in feed:
                feed[name] = np.zeros_like(feed["input_ids"])
        return session.run(None, feed)

    return run, {"framework": f"onnxruntime {onnxruntime.__version__}"}


def tokenize(tokenizer: Any, question: str, context: str) -> Any:
    return tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=MAX_LENGTH,
        stride=STRIDE,
        return_overflowing_tokens=True,
        padding=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("torch", "onnx"), required=True)
    parser.add_argument("--model", required=True, help="model directory (model.onnx in it for --backend onnx)")
    parser.add_argument("--workload", required=True, help='JSON file: [["question", "context"], ...]')
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds run before measuring")
    args = parser.parse_args()

    with open(args.workload, encoding="utf-8") as f:
        workload = [(question, context) for question, context in json.load(f)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    run, about = (torch_runner if args.backend == "torch" else onnx_runner)(args.model, tokenizer)
    lengths = [len(ids) for q, c in workload for ids in tokenize(tokenizer, q, c)["input_ids"]]

    def loop(seconds: float) -> tuple[list[float], float]:
        latencies: list[float] = []
        started = time.perf_counter()
        until = started + seconds
        i = 0
        while i == 0 or time.perf_counter() < until:  # at least one question, so percentiles exist
            question, context = workload[i % len(workload)]
            t0 = time.perf_counter()
            run(question, context)
            latencies.append(time.perf_counter() - t0)
            i += 1
        return latencies, time.perf_counter() - started

    loop(args.warmup)
    latencies, elapsed = loop(args.seconds)
    result = {
        "backend": args.backend,
        **about,
        "requests": len(latencies),
        "qps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p95_ms": percentile(latencies, 0.95) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "questions": len(workload),
        "windows": len(lengths),
        "mean_window_tokens": sum(lengths) / len(lengths),
    }
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
