"""How a CPU model's forward passes should share the cores: the measurements behind runtime/policy.py.

The bare model (ONNX Runtime and torch, no qaserve), on the same SQuAD dev windows as `make bench`, run in each of
the ways the policy chooses between, in interleaved rounds so that a noisy host's drift hits every way alike:

  lone window      one window at a time on a session with every core ("solo"), on a one-thread session ("lane"),
                   and on a session of ONNX Runtime's global shared thread pool (in a process of its own: the pool
                   is process-wide);
  two in flight    two callers side by side: on two one-thread lanes, and on two sessions sharing the global pool;
                   torch: two one-thread lanes against one model with every core taking them in turn;
  a long context   one question whose context needs several windows (--context-paragraphs), its windows as one
                   padded batch on every core (what the bare script does), in equal-length batches on every core
                   (the solo replica), one by one on every core, and spread over the one-thread lanes.

    make bench-threads                                   # about 2 minutes
    make bench-threads ARGS="--rounds 5 --seconds 3"
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.bare import MAX_LENGTH, STRIDE
from bench.evaldata import SQUAD_DEV, load_questions
from bench.load import EMBEDDED, ROOT, command_line, machine, publish, select_workload

Feed = dict[str, Any]


def onnx_session(path: Path, threads: int, shared_pool: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if shared_pool:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def windows_of(tokenizer: Any, workload: Sequence[tuple[str, str]], names: Sequence[str]) -> list[list[Feed]]:
    """Per question, its windows' model inputs as lists (as the tokenizer gives them)."""
    questions = []
    for question, context in workload:
        encoding = tokenizer(
            question, context, truncation="only_second", max_length=MAX_LENGTH, stride=STRIDE,
            return_overflowing_tokens=True,
        )  # fmt: skip
        questions.append([{n: encoding[n][i] for n in names} for i in range(len(encoding["input_ids"]))])
    return questions


def batch(tokenizer: Any, windows: Sequence[Feed], kind: str) -> dict[str, Any]:
    """Windows as one right-padded int64 batch: numpy (kind "np") or torch ("pt")."""
    import numpy as np

    padded = tokenizer.pad({n: [w[n] for w in windows] for n in windows[0]}, return_tensors=kind)
    return {n: np.asarray(v, dtype=np.int64) for n, v in padded.items()} if kind == "np" else dict(padded)


def latency(run: Callable[[Any], object], items: Sequence[Any], seconds: float) -> float:
    """Median ms per call, calling `run` over `items` in turn for `seconds`."""
    times: list[float] = []
    until = time.perf_counter() + seconds
    i = 0
    while i == 0 or time.perf_counter() < until:
        started = time.perf_counter()
        run(items[i % len(items)])
        times.append(time.perf_counter() - started)
        i += 1
    return statistics.median(times) * 1e3


def rate(run: Callable[[Any], object], items: Sequence[Any], seconds: float) -> float:
    """Items per second calling `run` over `items` in turn, on this thread, for `seconds`."""
    done = 0
    started = time.perf_counter()
    until = started + seconds
    while done == 0 or time.perf_counter() < until:
        run(items[done % len(items)])
        done += 1
    return done / (time.perf_counter() - started)


def side_by_side(runs: Sequence[Callable[[Any], object]], items: Sequence[Any], seconds: float) -> float:
    """Items per second with each of `runs` calling in its own thread for `seconds`."""
    done = [0] * len(runs)
    until = time.perf_counter() + seconds

    def loop(lane: int) -> None:
        i = lane
        while time.perf_counter() < until:
            runs[lane](items[i % len(items)])
            i += len(runs)
            done[lane] += 1

    threads = [threading.Thread(target=loop, args=(lane,)) for lane in range(len(runs))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def onnx_cases(
    model: Path, tokenizer: Any, one: list[list[Feed]], long: list[list[Feed]], cores: int
) -> dict[str, Any]:
    """The ONNX Runtime cases of one round, per-session thread pools, by label: a callable giving the number."""
    path = model / "model.onnx"
    solo = onnx_session(path, cores)
    lanes = [onnx_session(path, 1) for _ in range(cores)]
    names = [i.name for i in solo.get_inputs()]
    one = [[{n: w[n] for n in names} for w in windows] for windows in one]
    long = [[{n: w[n] for n in names} for w in windows] for windows in long]
    feeds = [batch(tokenizer, windows[:1], "np") for windows in one]
    lane_threads = ThreadPoolExecutor(cores)

    def one_by_one(windows: list[Feed]) -> None:
        for window in windows:
            solo.run(None, batch(tokenizer, [window], "np"))

    def equal_lengths(windows: list[Feed]) -> None:
        by_length: dict[int, list[Feed]] = {}
        for window in windows:
            by_length.setdefault(len(window["input_ids"]), []).append(window)
        for group in by_length.values():
            solo.run(None, batch(tokenizer, group, "np"))

    def spread(windows: list[Feed]) -> None:
        queue = iter(windows)
        lock = threading.Lock()

        def lane(session: Any) -> None:
            while True:
                with lock:
                    window = next(queue, None)
                if window is None:
                    return
                session.run(None, batch(tokenizer, [window], "np"))

        for future in [lane_threads.submit(lane, session) for session in lanes]:
            future.result()

    return {
        "onnx: lone window, solo (every core), p50 ms": lambda s: latency(lambda f: solo.run(None, f), feeds, s),
        "onnx: lone window, one-thread lane, p50 ms": lambda s: latency(lambda f: lanes[0].run(None, f), feeds, s),
        "onnx: two in flight, one-thread lanes, windows/s": lambda s: side_by_side(
            [lambda f, x=x: x.run(None, f) for x in lanes[:2]], feeds, s
        ),
        "onnx: long context, one padded batch on every core (bare), p50 ms": lambda s: latency(
            lambda ws: solo.run(None, batch(tokenizer, ws, "np")), long, s
        ),
        "onnx: long context, equal-length batches on every core (solo), p50 ms": lambda s: latency(
            equal_lengths, long, s
        ),
        "onnx: long context, one by one on every core, p50 ms": lambda s: latency(one_by_one, long, s),
        "onnx: long context, spread over one-thread lanes, p50 ms": lambda s: latency(spread, long, s),
    }


def torch_cases(model: Path, tokenizer: Any, one: list[list[Feed]], cores: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForQuestionAnswering

    module = AutoModelForQuestionAnswering.from_pretrained(str(model), dtype=torch.float32).eval()
    feeds = [batch(tokenizer, windows[:1], "pt") for windows in one]
    solo, lanes = ThreadPoolExecutor(1), ThreadPoolExecutor(cores)

    def sized(threads: int) -> None:
        torch.get_num_threads()  # a thread's first torch call sizes its team from the process; then its own size
        torch.set_num_threads(threads)

    solo.submit(sized, cores).result()
    barrier = threading.Barrier(cores)
    for future in [lanes.submit(lambda: (sized(1), barrier.wait())) for _ in range(cores)]:
        future.result()

    def forward(inputs: dict[str, Any]) -> None:
        with torch.inference_mode():
            module(**inputs)

    def in_turn(seconds: float) -> float:
        return solo.submit(rate, forward, feeds, seconds).result()

    def on_lanes(seconds: float) -> float:
        runs = [lambda f: lanes.submit(forward, f).result() for _ in range(cores)]
        return side_by_side(runs, feeds, seconds)

    return {
        "torch: windows/s, one model with every core, in turn": in_turn,
        "torch: windows/s, one-thread lanes side by side": on_lanes,
    }


def shared_pool_round(args: argparse.Namespace) -> dict[str, float]:
    """The global-pool cases, in a process of their own (the pool is process-wide): run `--shared-pool`."""
    command = [sys.executable, "-m", "bench.threads", "--shared-pool", "--model", str(args.model)]
    command += ["--seconds", str(args.seconds), "--limit", str(args.limit), "--cores", str(args.cores)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the global thread pool case failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def shared_pool_main(args: argparse.Namespace, tokenizer: Any, one: list[list[Feed]]) -> int:
    import onnxruntime as ort

    ort.set_global_thread_pool_sizes(args.cores, 1)
    sessions = [onnx_session(args.model / "model.onnx", 0, shared_pool=True) for _ in range(2)]
    feeds = [batch(tokenizer, windows[:1], "np") for windows in one]
    latency(lambda f: sessions[0].run(None, f), feeds, args.seconds / 4)  # warm-up
    result = {
        "onnx: lone window, global shared pool, p50 ms": latency(
            lambda f: sessions[0].run(None, f), feeds, args.seconds
        ),
        "onnx: two in flight, global shared pool, windows/s": side_by_side(
            [lambda f, s=s: s.run(None, f) for s in sessions], feeds, args.seconds
        ),
    }
    print(json.dumps(result))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=EMBEDDED, help="model directory with model.onnx")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per case and round")
    parser.add_argument("--limit", type=int, default=100, help="questions (every 35th of SQuAD dev)")
    parser.add_argument("--context-paragraphs", type=int, default=4, help="paragraphs per long context (default 4)")
    parser.add_argument("--cores", type=int, default=2, help="threads of 'every core' and lanes (default 2)")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="ONNX Runtime only")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--shared-pool", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    questions = load_questions(SQUAD_DEV)
    names = tokenizer.model_input_names
    one = windows_of(tokenizer, select_workload(questions, 35, args.limit), names)
    if args.shared_pool:
        return shared_pool_main(args, tokenizer, one)
    long = windows_of(tokenizer, select_workload(questions, 35, args.limit, args.context_paragraphs), names)
    cases = onnx_cases(args.model, tokenizer, one, long, args.cores)
    if args.torch:
        cases |= torch_cases(args.model, tokenizer, one, args.cores)
    for case in cases.values():  # warm-up
        case(args.seconds / 4)
    measured: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for label, case in cases.items():
            measured.setdefault(label, []).append(case(args.seconds))
        for label, value in shared_pool_round(args).items():
            measured.setdefault(label, []).append(value)
        print(f"  round {round_ + 1} of {args.rounds} done", file=sys.stderr)
    lines = [
        f"qaserve bench.threads: {len(one)} questions of SQuAD dev (1 in 35), long contexts of "
        f"{args.context_paragraphs} paragraphs ({sum(map(len, long)) / len(long):.1f} windows each), "
        f"{args.seconds:g} s per case, {args.rounds} interleaved round(s), {args.cores} cores",
        "",
        f"- machine: {machine()}",
        f"- command: `{command_line(sys.argv[1:] if argv is None else argv, 'bench.threads')}`",
        "",
        "| case | median | rounds |",
        "|---|--:|---|",
    ]
    for label in sorted(measured):
        values = measured[label]
        lines.append(f"| {label} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
