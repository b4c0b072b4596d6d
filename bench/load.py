"""Throughput and latency of qaserve against the bare model, in one run, printed as one table with ratios.

Rows per model: (a) raw in-process: the same model and tokenizer, tokenize + forward + decode, batch 1 latency and
the best batched throughput; (b) qaserve with batching off at concurrency 32; (c) qaserve with batching on, closed-loop
clients at concurrency 1, 8, 32, 64. Inputs are SQuAD v1.1 dev questions; a share of them get a context of three
paragraphs, longer than max_seq_len, so windows are exercised.

    make bench                      # both models
    make bench ARGS="--models embedded --seconds 5"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from qaserve.config import EMBEDDED_MODEL, ModelSpec
from qaserve.qa import QAParams, decode_answers
from qaserve.runtime.model import QAModel, WindowInput
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "squad-v1.1-dev.json"
CONCURRENCY = (1, 8, 32, 64)


@dataclass(frozen=True)
class Sample:
    question: str
    context: str


def load_samples(path: Path, count: int, long_share: float, seed: int = 0) -> list[Sample]:
    """SQuAD questions; `long_share` of them get their paragraph plus the next two of the same article."""
    data = json.loads(path.read_text())["data"]
    rng = random.Random(seed)
    pool: list[Sample] = []
    for article in data:
        paragraphs = article["paragraphs"]
        for i, paragraph in enumerate(paragraphs):
            for qa in paragraph["qas"]:
                context = paragraph["context"]
                if rng.random() < long_share and i + 2 < len(paragraphs):
                    context = " ".join(p["context"] for p in paragraphs[i : i + 3])
                pool.append(Sample(qa["question"], context))
    rng.shuffle(pool)
    return pool[:count]


def build_distilbert_base(directory: Path) -> Path:
    """A distilbert-base-sized (66M parameters) random-weight QA model with the embedded tokenizer."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForQuestionAnswering

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=768, n_layers=6, n_heads=12, hidden_dim=3072)
    DistilBertForQuestionAnswering(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- (a) the bare model --------------------------------------------------------------------------------------------


def raw_latency(model: QAModel, samples: list[Sample], seconds: float) -> tuple[float, float]:
    """p50 seconds and requests/s of tokenize + forward + decode, one request at a time."""
    replica = model.replicas[0]
    params = model.resolve(QAParams())
    latencies: list[float] = []
    started = time.perf_counter()
    until = started + seconds
    for sample in cycle(samples):
        if time.perf_counter() > until:
            break
        t0 = time.perf_counter()
        windows = model.split(sample.question, sample.context, params)
        outputs = replica.forward(QAModel.inputs(windows))
        decode(sample, windows, outputs, params)
        latencies.append(time.perf_counter() - t0)
    return statistics.median(latencies), len(latencies) / (time.perf_counter() - started)


def raw_batched(model: QAModel, samples: list[Sample], seconds: float) -> tuple[float, int]:
    """Best requests/s of tokenize + forward + decode with ideal batching: groups of 64 requests, their windows
    sorted by length and packed up to a padded-token budget (0: one window per pass); the best budget wins.
    No server, no queueing: the limit a server on this model and machine can approach."""
    replica = model.replicas[0]
    params = model.resolve(QAParams())
    best, best_budget = 0.0, 0
    budgets = (0, 512, 1024, 2048, 4096)  # 0: one window per forward pass
    for budget in budgets:
        done = 0
        it = cycle(samples)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds / len(budgets):
            group = []
            for _ in range(64):
                sample = next(it)
                group.append((sample, model.split(sample.question, sample.context, params)))
            flat = [(r, w, x) for r, (_, windows) in enumerate(group) for w, x in enumerate(QAModel.inputs(windows))]
            flat.sort(key=lambda item: len(item[2].input_ids))
            outputs: dict[tuple[int, int], object] = {}
            batch: list[tuple[int, int, WindowInput]] = []
            for item in [*flat, None]:
                width = max([len(x.input_ids) for *_, x in batch] + ([len(item[2].input_ids)] if item else [0]))
                if batch and (item is None or width * (len(batch) + 1) > max(budget, width)):
                    for (r, w, _), out in zip(batch, replica.forward([x for *_, x in batch]), strict=True):
                        outputs[(r, w)] = out
                    batch = []
                if item is not None:
                    batch.append(item)
            for r, (sample, windows) in enumerate(group):
                decode(sample, windows, [outputs[(r, w)] for w in range(len(windows))], params)
            done += len(group)
        qps = done / (time.perf_counter() - started)
        if qps > best:
            best, best_budget = qps, budget
    return best, best_budget


def decode(sample: Sample, windows, outputs, params: QAParams) -> None:  # type: ignore[no-untyped-def]
    start = torch.nn.utils.rnn.pad_sequence([o.start for o in outputs], batch_first=True)
    end = torch.nn.utils.rnn.pad_sequence([o.end for o in outputs], batch_first=True)
    decode_answers(sample.context, windows, start, end, params)


def cycle(samples: list[Sample]) -> Iterator[Sample]:
    while True:
        yield from samples


# -- (b), (c) the server -------------------------------------------------------------------------------------------


class ServerProcess:
    """`qaserve serve` in a subprocess on free ports."""

    def __init__(self, model_dir: Path, name: str, **flags: object) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        args = [
            sys.executable, "-m", "qaserve.main", "serve", "--model", str(model_dir), "--model-name", name,
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--log-level", "WARNING",
        ]  # fmt: skip
        for key, value in flags.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(args)
        self.target = f"127.0.0.1:{self.port}"

    async def ready(self, limit: float = 120) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        until = time.monotonic() + limit
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < until:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def scrape(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^(qaserve_(?:batch_windows|padding_ratio)_(?:sum|count))\{[^}]*\} (\S+)$", line)
            if match:
                values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
        return values

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoadResult:
    qps: float
    p50: float
    p95: float
    p99: float
    errors: int
    windows_per_batch: float
    padding: float


async def closed_loop(server: ServerProcess, samples: list[Sample], concurrency: int, seconds: float) -> LoadResult:
    """`concurrency` clients, each sending its next request as soon as the previous one returns."""
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        requests = [pb.AnswerRequest(question=s.question, context=s.context) for s in samples]

        async def client(offset: int, until: float, record: bool) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                try:
                    await stub.Answer(requests[i % len(requests)], timeout=30)
                    if record:
                        latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    errors += record
                i += concurrency

        warm_until = time.perf_counter() + min(2.0, seconds / 4)
        await asyncio.gather(*(client(c, warm_until, False) for c in range(concurrency)))
        before = await asyncio.to_thread(server.scrape)
        started = time.perf_counter()
        await asyncio.gather(*(client(c, started + seconds, True) for c in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = await asyncio.to_thread(server.scrape)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = delta("qaserve_batch_windows_count") or 1.0
    return LoadResult(
        qps=len(latencies) / elapsed,
        p50=percentile(latencies, 0.50),
        p95=percentile(latencies, 0.95),
        p99=percentile(latencies, 0.99),
        errors=errors,
        windows_per_batch=delta("qaserve_batch_windows_sum") / batches,
        padding=delta("qaserve_padding_ratio_sum") / batches,
    )


# -- the run -------------------------------------------------------------------------------------------------------


def bench_model(name: str, model_dir: Path, samples: list[Sample], seconds: float) -> list[str]:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = QAModel.load(ModelSpec(name, str(model_dir), device="cpu"))
    bs1, bs1_qps = raw_latency(model, samples, seconds)
    batched, budget = raw_batched(model, samples, seconds)
    model.close()
    windows = statistics.mean(len(model.split(s.question, s.context, model.resolve(QAParams()))) for s in samples[:200])
    del model

    rows = [
        f"| {name} | (a) raw, batch 1 | 1 | {bs1_qps:.1f} | {bs1 * 1e3:.1f} | | | | |",
        f"| {name} | (a) raw, best batching ({f'<= {budget} padded tokens' if budget else '1 window'}) | - | "
        f"{batched:.1f} | | | | | |",
    ]
    results: dict[tuple[str, int], LoadResult] = {}
    for label, flags, levels in (
        ("(b) qaserve, batching off", {"max_batch_windows": 1}, (32,)),
        ("(c) qaserve, batching on", {}, CONCURRENCY),
    ):
        server = ServerProcess(model_dir, name, device="cpu", **flags)
        try:
            asyncio.run(server.ready())
            for c in levels:
                r = asyncio.run(closed_loop(server, samples, c, seconds))
                results[(label[:3], c)] = r
                rows.append(
                    f"| {name} | {label} | {c} | {r.qps:.1f} | {r.p50 * 1e3:.1f} | {r.p95 * 1e3:.1f} | "
                    f"{r.p99 * 1e3:.1f} | {r.windows_per_batch:.1f} / {r.padding:.2f} | {r.errors} |"
                )
        finally:
            server.stop()

    c1, c32, b32 = results[("(c)", 1)], results[("(c)", 32)], results[("(b)", 32)]
    rows.append(
        f"| {name} | **ratios** | | (c)@32 / (a) batched = **{c32.qps / batched:.2f}**; "
        f"(c)@32 / (b)@32 = **{c32.qps / b32.qps:.2f}** | (c)@1 p50 - (a) bs1 = **{(c1.p50 - bs1) * 1e3:+.1f} ms** "
        f"| | | avg windows/request {windows:.2f} | |"
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="embedded,distilbert-base", help="comma-separated: embedded, distilbert-base"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--long-share", type=float, default=0.2, help="share of contexts made of three paragraphs")
    parser.add_argument("--data", type=Path, default=SQUAD)
    args = parser.parse_args()

    samples = load_samples(args.data, args.samples, args.long_share)
    header = [
        f"qaserve bench: {len(samples)} SQuAD v1.1 dev questions ({args.long_share:.0%} with 3-paragraph contexts), "
        f"{args.seconds:g} s per row, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "",
        "| model | row | concurrency | requests/s | p50 ms | p95 ms | p99 ms | windows per batch / padding | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1):
        for name in args.models.split(","):
            if name == "embedded":
                model_dir = EMBEDDED_MODEL
            elif name == "distilbert-base":
                model_dir = build_distilbert_base(Path(tmp) / "distilbert-base")
            else:
                parser.error(f"unknown model {name!r}")
            for row in bench_model(name, model_dir, samples, args.seconds):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
