"""The bench on a CUDA GPU, in a few minutes: the bare model in torch fp32/fp16/bf16 and in ONNX Runtime's CUDA
provider over a sweep of batch sizes, then qaserve --backend torch on the GPU at concurrency 1/8/32/64, with the
GPU's utilisation (NVIDIA management library, where pynvml or nvidia-ml-py is installed) beside every row.

    make bench-gpu                                        # the embedded model; about 2-3 minutes
    make bench-gpu ARGS="--model DIR --dtypes float16 --batch-sizes 1,8,64 --markdown gpu.md"
    make bench-gpu ARGS=--dry-run                         # the same steps on the CPU, briefly: checks the script

Bare rows feed windows of SQuAD dev questions (every 35th, each with its own paragraph) in batches of the given size,
padded to the batch's longest window, and count windows per second (tokenizing excluded: the model is the limit
being measured). The server rows count answers per second under closed-loop gRPC clients, as `make bench` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bare import MAX_LENGTH, STRIDE, percentile
from bench.drive import Connection, closed_loop_to
from bench.evaldata import SQUAD_DEV, load_questions
from bench.load import EMBEDDED, ServerProcess, command_line, machine, publish, select_workload, version

DTYPES = ("float32", "float16", "bfloat16")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
CONCURRENCY = (1, 8, 32, 64)


@dataclass(frozen=True)
class GpuRow:
    label: str
    batch: int  # windows per forward pass (bare rows) or requests in flight (server rows)
    rate: float  # windows/s (bare) or answers/s (server)
    p50: float  # ms per forward pass (bare) or per answer (server)
    p99: float
    utilisation: float | None  # mean GPU utilisation, %, where NVML is available


class Utilisation:
    """Samples the GPU's utilisation every 50 ms while in use (NVML); mean() is None without NVML or a GPU."""

    def __init__(self, index: int) -> None:
        self._handle: Any = None
        self._nvml: Any = None
        with contextlib.suppress(Exception):  # no pynvml, no driver, no such device: no utilisation column
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml

    @contextlib.contextmanager
    def sampling(self) -> Iterator[list[float]]:
        samples: list[float] = []
        if self._handle is None:
            yield samples
            return
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()

    @staticmethod
    def mean(samples: list[float]) -> float | None:
        return statistics.fmean(samples) if samples else None


def windows_of(tokenizer: Any, workload: Sequence[tuple[str, str]]) -> list[dict[str, list[int]]]:
    """Every window of the workload, as bench/bare.py tokenizes it."""
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    found = []
    for question, context in workload:
        encoded = tokenizer(
            question, context, truncation="only_second", max_length=MAX_LENGTH, stride=STRIDE,
            return_overflowing_tokens=True, padding=False,
        )  # fmt: skip
        found += [{name: encoded[name][i] for name in names} for i in range(len(encoded["input_ids"]))]
    return found


def batches(tokenizer: Any, windows: list[dict[str, list[int]]], size: int) -> Iterator[dict[str, Any]]:
    """Endless batches of `size` consecutive windows, padded to their longest, as numpy int64."""
    start = 0
    while True:
        chunk = [windows[(start + i) % len(windows)] for i in range(size)]
        yield tokenizer.pad(chunk, return_tensors="np")
        start = (start + size) % len(windows)


def sweep(
    label: str,
    run: Callable[[dict[str, Any]], None],
    tokenizer: Any,
    windows: list[dict[str, list[int]]],
    sizes: Sequence[int],
    seconds: float,
    gpu: Utilisation,
) -> list[GpuRow]:
    """`run(batch)` (which must wait for the device) at each batch size for `seconds` after a short warm-up."""
    rows = []
    for size in sizes:
        feed = batches(tokenizer, windows, size)
        for _ in range(3):
            run(next(feed))
        latencies: list[float] = []
        with gpu.sampling() as samples:
            started = time.perf_counter()
            while not latencies or time.perf_counter() - started < seconds:
                batch = next(feed)
                t0 = time.perf_counter()
                run(batch)
                latencies.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
        ms = [s * 1e3 for s in latencies]
        row = GpuRow(
            label, size, len(ms) * size / elapsed, percentile(ms, 0.5), percentile(ms, 0.99), gpu.mean(samples)
        )
        progress(row)
        rows.append(row)
    return rows


def torch_runner(model_dir: Path, device: str, dtype: str) -> Callable[[dict[str, Any]], None]:
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval().to(device)

    def run(batch: dict[str, Any]) -> None:
        with torch.inference_mode():
            output = model(**{k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()})
            output.start_logits.float().cpu()  # waits for the device, as a server must to answer

    return run


def onnx_runner(model_dir: Path, provider: str, index: int) -> Callable[[dict[str, Any]], None] | None:
    """model.onnx on `provider`; None where the model or the provider is missing."""
    import numpy as np
    import onnxruntime

    path = model_dir / "model.onnx"
    if not path.is_file() or provider not in onnxruntime.get_available_providers():
        return None
    options = [{"device_id": index}] if provider == "CUDAExecutionProvider" else [{}]
    session = onnxruntime.InferenceSession(str(path), providers=[provider], provider_options=options)
    names = [i.name for i in session.get_inputs()]

    def run(batch: dict[str, Any]) -> None:
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in names if name in batch}
        for name in names:
            feed.setdefault(name, np.zeros_like(feed["input_ids"]))
        session.run(None, feed)

    return run


def server_rows(
    args: argparse.Namespace, workload: list[tuple[str, str]], dtype: str, gpu: Utilisation
) -> list[GpuRow]:
    extra = ["--dtype", dtype, "--device", args.device, "--max-batch-windows", str(max(args.batch_sizes))]
    server = ServerProcess(args.qaserve, args.model, "gpu", "torch", False, extra)
    rows = []
    try:
        asyncio.run(server.ready())
        for concurrency in args.concurrency:
            loop = closed_loop_to(Connection(server.target), workload, concurrency, args.seconds, args.warmup)
            with gpu.sampling() as samples:
                measured = asyncio.run(loop)
            ms = [s * 1e3 for s in measured.latencies] or [float("nan")]
            label = f"qaserve --backend torch --dtype {dtype}"
            row = GpuRow(label, concurrency, measured.qps, percentile(ms, 0.5), percentile(ms, 0.99), gpu.mean(samples))
            progress(row)
            rows.append(row)
    finally:
        server.stop()
    return rows


def progress(row: GpuRow) -> None:
    print(f"  {row.label} @ {row.batch}: {row.rate:.1f}/s, p50 {row.p50:.2f} ms", file=sys.stderr)


def table(rows: Sequence[GpuRow]) -> list[str]:
    lines = [
        "| row | batch or concurrency | windows/s or q/s | p50 ms | p99 ms | GPU utilisation |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        used = f"{row.utilisation:.0f}%" if row.utilisation is not None else "n/a"
        lines.append(f"| {row.label} | {row.batch} | {row.rate:.1f} | {row.p50:.2f} | {row.p99:.2f} | {used} |")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=EMBEDDED, help="model directory (default: the embedded model)")
    parser.add_argument("--device", default="cuda:0", help="the GPU (default cuda:0)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="torch dtypes to sweep")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="windows per forward pass")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="server rows' levels")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per row (default 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="server rows' warm-up seconds (default 1)")
    parser.add_argument("--limit", type=int, default=100, help="questions of the workload (default 100)")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--qaserve", default=str(Path(sys.executable).with_name("qaserve")), help="the qaserve executable to start"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every step on the CPU in float32, batch sizes 1,2, concurrency 1,2, 0.2 s a row: checks the script",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.dtypes, args.batch_sizes, args.concurrency = "cpu", "float32", "1,2", "1,2"
        args.seconds, args.warmup, args.limit = 0.2, 0.0, min(args.limit, 10)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := set(args.dtypes) - set(DTYPES):
        parser.error(f"--dtypes: unknown {', '.join(sorted(unknown))} ({', '.join(DTYPES)})")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: torch sees no CUDA GPU here (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    index = int(args.device.partition(":")[2] or 0)
    gpu = Utilisation(index)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    workload = select_workload(load_questions(SQUAD_DEV), 35, args.limit)
    windows = windows_of(tokenizer, workload)
    rows: list[GpuRow] = []
    for dtype in args.dtypes:
        run = torch_runner(args.model, args.device, dtype)
        rows += sweep(f"bare torch {dtype}", run, tokenizer, windows, args.batch_sizes, args.seconds, gpu)
    provider = "CPUExecutionProvider" if args.device == "cpu" else "CUDAExecutionProvider"
    onnx = onnx_runner(args.model, provider, index)
    notes = []
    if onnx is None:
        notes.append(f"no ONNX Runtime rows: {provider} or model.onnx missing (onnxruntime-gpu provides the former)")
    else:
        rows += sweep(f"bare ONNX Runtime, {provider}", onnx, tokenizer, windows, args.batch_sizes, args.seconds, gpu)
    for dtype in args.dtypes:
        rows += server_rows(args, workload, dtype, gpu)
    device = torch.cuda.get_device_name(index) if args.device.startswith("cuda") else machine()
    report = [
        f"qaserve GPU bench on {device}: {len(workload)} questions ({len(windows)} windows), {args.seconds:g} s a row",
        "",
        f"- versions: torch {version('torch')} (CUDA {torch.version.cuda}), onnxruntime {version('onnxruntime')}"
        f"{', onnxruntime-gpu ' + version('onnxruntime-gpu') if version('onnxruntime-gpu') != 'absent' else ''}, "
        f"transformers {version('transformers')}",
        f"- command: `{command_line(argv, 'bench.gpu')}`",
        *(f"- {note}" for note in notes),
        "- bare rows: windows per second in batches of the given size; server rows: answers per second at the given "
        "concurrency; GPU utilisation n/a without NVML (pip install nvidia-ml-py)",
        "",
        *table(rows),
    ]
    publish(report, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
