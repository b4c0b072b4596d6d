"""Throughput and latency of qaserve against the bare model, in interleaved rounds, printed as one table with ratios.

Workload: SQuAD v1.1 dev questions, every 35th one (302), each with its own paragraph as context (one window each,
nearly always; --context-paragraphs N joins the N - 1 paragraphs that follow it, for long contexts of several
windows). Every row runs the same questions for the same measured seconds, after a warm-up:

  (a)  bare transformers + torch fp32, in its own clean process (bench/bare.py: no qaserve import, the default
       environment), tokenize + forward, one question at a time; answers are not decoded, the model call is the
       baseline;
  (a') the same with ONNX Runtime on the model directory's model.onnx (default SessionOptions);
  qaserve serve --backend torch and --backend onnx, response cache off, each under closed-loop gRPC clients at
       concurrency 1, 8, 32 and 64 (every in-flight slot loops over the workload);
  one row of the default server (--backend auto, response cache on): the workload repeats, so it mostly measures
       cache hits;
  on the same cache-off servers, the other doors (bench/doors.py): HTTP JSON (POST /v1/answer, keep-alive) at
       concurrency 1 and 32, the Open Inference Protocol over gRPC (ModelInfer) at concurrency 1, and the streams:
       AnswerMany at concurrency 32 (all 32 in-flight questions as items of one stream) and AnswerProgressive at
       concurrency 1 (latency to its final message), each compared with the qaserve.v1 gRPC Answer row of its
       concurrency.

Every row is measured once per round (--rounds, 3), each round running them all in turn (bare, servers, bare, ...),
so that a noisy host's drift shows as a row's range and hits both sides of a ratio alike. The table gives each row's
median and range; ratios against (a) and (a') (q/s, and p50 difference at concurrency 1) are taken round by round,
then their median and range; then the targets (bench/rounds.py), and with --plot a PNG of q/s and p99 against
concurrency.

    make bench                                     # 3 rounds, about 5 minutes each per model
    make bench ARGS="--rounds 1 --seconds 5 --limit 100 --markdown bench.md --plot bench.png"

With --target HOST:PORT the same workload goes to a server started elsewhere (a port-forwarded pod, a Service),
plaintext or --tls, with --token-file, over --channels connections: closed loop at each --concurrency, or with --rate
open loop at each fixed arrival rate (latency from each request's due time), plus a PNG of p50/p99 against the
offered rate (--plot):

    python -m bench.load --target localhost:50051 --rate 5,10,20,40 --seconds 30 --plot load.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import grpc

from bench import rounds
from bench.bare import percentile
from bench.doors import ANSWER_MANY, ANSWER_PROGRESSIVE, GRPC, HTTP_JSON, V2_GRPC, door
from bench.drive import Connection, Measured, closed_loop, closed_loop_to, format_errors, open_loop, requests_of, stubs
from bench.evaldata import SQUAD_DEV, Question, load_questions

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "models" / "minilm-l6-squadshifts"
BARE = Path(__file__).resolve().with_name("bare.py")
CONCURRENCY = (1, 8, 32, 64)
CACHE_ROW_CONCURRENCY = 32
DOOR_CONCURRENCY = {HTTP_JSON: (1, 32), V2_GRPC: (1,), ANSWER_MANY: (32,), ANSWER_PROGRESSIVE: (1,)}
# Variables that change how the frameworks run; the baselines and the servers start without them, as `make run` does
# in a plain shell.
CLEAN_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "QASERVE_")


@dataclass
class Row:
    model: str
    label: str
    backend: str  # torch | onnx | auto
    concurrency: int
    qps: float
    p50: float  # milliseconds
    p95: float
    p99: float
    errors: Counter[str] = field(default_factory=Counter)
    bare: bool = False
    offered: float | None = None  # open loop: the arrival rate, q/s
    door: str = GRPC
    round: int = 1  # which of the interleaved rounds measured it

    @classmethod
    def of(
        cls,
        model: str,
        label: str,
        backend: str,
        concurrency: int,
        measured: Measured,
        offered: float | None = None,
        door: str = GRPC,
    ) -> Row:
        """A measured row: percentiles of its latencies in milliseconds."""
        ms = [s * 1e3 for s in measured.latencies] or [float("nan")]
        p50, p95, p99 = (percentile(ms, q) for q in (0.5, 0.95, 0.99))
        return cls(
            model, label, backend, concurrency, measured.qps, p50, p95, p99, measured.errors, offered=offered, door=door
        )


def select_workload(
    questions: Sequence[Question], stride: int, limit: int | None, paragraphs: int = 1
) -> list[tuple[str, str]]:
    """Every `stride`-th question (from the first), each with its own paragraph and the `paragraphs` - 1 that follow
    it in the file (a long context of several windows, the answer in its first); at most `limit` of them."""
    contexts = list(dict.fromkeys(q.context for q in questions))
    place = {context: i for i, context in enumerate(contexts)}

    def context_of(q: Question) -> str:
        return "\n\n".join(contexts[place[q.context] : place[q.context] + paragraphs])

    return [(q.question, context_of(q)) for q in questions[::stride]][:limit]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_PREFIXES)}


def onnx_label(model_dir: Path) -> str:
    """ "int8" or "float32" from the export manifest, when there is one."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        quantization = json.loads((model_dir / "qaserve-onnx.json").read_text())["quantization"]
        return "int8" if quantization == "int8" else "float32"
    return "model.onnx"


# -- (a), (a') the bare model ---------------------------------------------------------------------------------------


def run_bare(
    backend: str, model: str, model_dir: Path, workload_file: Path, seconds: float, warmup: float
) -> tuple[Row, dict[str, object]]:
    command = [sys.executable, "-P", str(BARE), "--backend", backend, "--model", str(model_dir)]
    command += ["--workload", str(workload_file), "--seconds", str(seconds), "--warmup", str(warmup)]
    done = subprocess.run(command, env=clean_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bare {backend} baseline failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    label = "(a) bare torch fp32" if backend == "torch" else f"(a') bare ONNX Runtime {onnx_label(model_dir)}"
    row = Row(model, label, backend, 1, result["qps"], result["p50_ms"], result["p95_ms"], result["p99_ms"], bare=True)
    return row, result


# -- the server rows -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`qaserve serve` in its own process on a free loopback port, CPU, metrics endpoint off, otherwise with the
    defaults of `make run` (plus --server-args)."""

    def __init__(
        self, qaserve: str, model_dir: Path, name: str, backend: str, cache: bool, extra: Sequence[str]
    ) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        http_port = free_port()
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.model = name
        self.command = [
            qaserve, "serve", "--model", str(model_dir), "--model-name", name, "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "0", "--drain-seconds", "0",
            "--http-port", str(http_port),
        ]  # fmt: skip
        if backend != "auto":  # auto is the default: that row starts the server as `make run` does
            self.command += ["--backend", backend]
        if not cache:
            self.command += ["--response-cache-bytes", "0"]
        self.command += list(extra)
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (the server's output; closed in stop())
        self.proc = subprocess.Popen(self.command, env=clean_env(), stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    async def ready(self, limit: float = 300.0) -> None:
        # The tests' module (make bench puts tests/ on the path); --target runs start no server and need no tests/.
        from qaserve_testing import wait_serving

        async with grpc.aio.insecure_channel(self.target) as channel:
            await wait_serving(
                channel, self.proc, limit, output=lambda: f"{shlex.join(self.command)}:\n{self.output()}"
            )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _door_loop(
    server: ServerProcess, name: str, workload: list[tuple[str, str]], concurrency: int, seconds: float, warmup: float
) -> Measured:
    async with door(name, server.target, server.http_url, server.model, workload) as (found, requests):
        return await closed_loop(found, requests, concurrency, seconds, warmup)


def server_rows(
    args: argparse.Namespace,
    model: str,
    model_dir: Path,
    workload: list[tuple[str, str]],
    backend: str,
    cache: bool,
    round_: int = 1,
) -> list[Row]:
    server = ServerProcess(args.qaserve, model_dir, model, backend, cache, shlex.split(args.server_args))
    label = f"qaserve --backend {backend}, cache off" if not cache else "qaserve default (backend auto, cache on)"
    rows = []
    try:
        asyncio.run(server.ready())
        for concurrency in [CACHE_ROW_CONCURRENCY] if cache else args.concurrency:
            measured = asyncio.run(
                closed_loop_to(Connection(server.target), workload, concurrency, args.seconds, args.warmup)
            )
            row = Row.of(model, label, backend, concurrency, measured)
            row.round = round_
            progress(row)
            rows.append(row)
        doors = DOOR_CONCURRENCY.items() if not cache and args.doors else ()
        for name, levels in doors:
            for concurrency in levels:
                measured = asyncio.run(_door_loop(server, name, workload, concurrency, args.seconds, args.warmup))
                row = Row.of(model, f"{label}, {name}", backend, concurrency, measured, door=name)
                row.round = round_
                progress(row)
                rows.append(row)
    finally:
        server.stop()
    return rows


# -- a server started elsewhere (--target) -------------------------------------------------------------------------


def connection_of(args: argparse.Namespace) -> Connection:
    token = Path(args.token_file).read_text(encoding="utf-8").strip() if args.token_file else None
    return Connection(args.target, args.channels, args.tls, args.ca_file, args.server_name, token)


async def target_rows(args: argparse.Namespace, workload: list[tuple[str, str]]) -> list[Row]:
    """Open loop at each --rate, or else closed loop at each --concurrency, against --target."""
    rows = []
    model = args.model or "(server default)"
    async with stubs(connection_of(args)) as found:
        requests = requests_of(workload, args.model)
        for rate in args.rate:
            measured = await open_loop(found, requests, rate, args.seconds, args.warmup)
            rows.append(Row.of(model, f"open loop, {args.channels} channels", "remote", 0, measured, offered=rate))
            progress(rows[-1])
        for concurrency in [] if args.rate else args.concurrency:
            measured = await closed_loop(found, requests, concurrency, args.seconds, args.warmup)
            rows.append(Row.of(model, f"closed loop, {args.channels} channels", "remote", concurrency, measured))
            progress(rows[-1])
    return rows


def target_table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | row | offered q/s | concurrency | q/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        offered = f"{row.offered:g}" if row.offered is not None else ""
        concurrency = str(row.concurrency) if row.offered is None else ""
        lines.append(
            f"| {row.model} | {row.label} | {offered} | {concurrency} | {row.qps:.1f} | {row.p50:.1f} "
            f"| {row.p95:.1f} | {row.p99:.1f} | {format_errors(row.errors)} |"
        )
    return lines


def write_plot(rows: list[Row], path: Path, title: str) -> None:
    """p50 and p99 (ms, log scale) against the offered rate of the open-loop rows, and the answered rate."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    open_rows = sorted((r for r in rows if r.offered is not None), key=lambda r: r.offered or 0.0)
    offered = [r.offered for r in open_rows]
    figure, latency = pyplot.subplots(figsize=(8, 5))
    latency.plot(offered, [r.p50 for r in open_rows], marker="o", label="p50")
    latency.plot(offered, [r.p99 for r in open_rows], marker="o", label="p99")
    latency.set_yscale("log")
    latency.set_xlabel("offered rate, q/s (open loop)")
    latency.set_ylabel("latency from the due time, ms")
    answered = latency.twinx()
    answered.plot(offered, [r.qps for r in open_rows], color="grey", linestyle="--", marker=".", label="answered q/s")
    answered.set_ylabel("answered q/s")
    handles = latency.get_legend_handles_labels()[0] + answered.get_legend_handles_labels()[0]
    latency.legend(handles=handles, loc="upper left")
    latency.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def kept_up(rows: list[Row]) -> str:
    """The highest offered rate answered in full (95% of it per second, no errors): where saturation begins."""
    kept = [r.offered for r in rows if r.offered is not None and r.qps >= 0.95 * r.offered and not r.errors]
    if not kept:
        return "- kept up with none of the offered rates"
    return f"- kept up with {max(kept):g} q/s offered (answered 95% or more of it, no errors)"


def target_main(args: argparse.Namespace, argv: Sequence[str], workload: list[tuple[str, str]]) -> int:
    rows = asyncio.run(target_rows(args, workload))
    errors = sum(sum(row.errors.values()) for row in rows)
    report = [
        f"qaserve bench against {args.target}: {len(workload)} questions of {args.data.name} (1 in {args.stride}), "
        f"{args.seconds:g} s per row after {args.warmup:g} s of warm-up, {args.channels} gRPC channels"
        f"{', TLS' if args.tls or args.ca_file else ''}{', bearer token' if args.token_file else ''}",
        "",
        f"- load generator: {machine()}",
        f"- command: `{command_line(argv)}`",
        "- open loop: request i is due at start + i/rate whatever came before; latency counts from the due time",
        "",
        *target_table(rows),
        "",
        *([kept_up(rows)] if args.rate else []),
        f"- errors: {errors}",
    ]
    if args.rate:
        plot = args.plot or Path("load.png")
        write_plot(rows, plot, f"qaserve at {args.target}")
        report.append(f"- plot: {plot}")
    publish(report, args.markdown)
    return 1 if errors else 0


# -- the report ------------------------------------------------------------------------------------------------------


def progress(row: Row) -> None:
    print(
        f"  round {row.round}, {row.model}: {row.label} @ {row.concurrency}: {row.qps:.1f} q/s, p50 {row.p50:.1f} ms",
        file=sys.stderr,
    )


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} CPU cores ({usable} usable by this process), {cpu}, {system}"


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)  # fmt: skip
        if done.returncode == 0:
            return done.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")
    return "unknown"


def publish(lines: Sequence[str], markdown: Path | None) -> None:
    """Prints a report, and writes it to `markdown` where given."""
    text = "\n".join(lines)
    print(text)
    if markdown:
        markdown.write_text(text + "\n")


def command_line(argv: Sequence[str], module: str = "bench.load") -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", module, *argv])


# -- the run ---------------------------------------------------------------------------------------------------------


def build_distilbert_base(directory: Path) -> Path:
    """A distilbert-base-sized (66M parameters) random-weight QA model with the embedded tokenizer: it measures
    cost, not answers."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForQuestionAnswering

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=768, n_layers=6, n_heads=12, hidden_dim=3072)
    DistilBertForQuestionAnswering(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def model_dirs(names: str, scratch: Path) -> list[tuple[str, Path]]:
    found = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name == "embedded":
            found.append(("embedded", EMBEDDED))
        elif name == "distilbert-base":
            found.append((name, build_distilbert_base(scratch / name)))
        elif Path(name).is_dir():
            found.append((Path(name).resolve().name, Path(name).resolve()))
        else:
            raise SystemExit(f"--models: {name!r} is neither embedded, distilbert-base nor a model directory")
    return found


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        default="embedded",
        help="comma-separated: embedded, distilbert-base (random weights, 66M parameters), or model directories",
    )
    parser.add_argument(
        "--backends", default="torch,onnx", help="backends served with the cache off: torch, onnx, or empty"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every local row (default 3)")
    parser.add_argument(
        "--context-paragraphs", type=int, default=1, help="paragraphs per context: 1, or more for long contexts"
    )
    parser.add_argument("--warmup", type=float, help="seconds run before each row is measured (default min(2, s/4))")
    parser.add_argument("--stride", type=int, default=35, help="every N-th SQuAD dev question (default 35)")
    parser.add_argument("--limit", type=int, help="at most N questions")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="closed-loop levels")
    parser.add_argument(
        "--doors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure, on each cache-off server at these concurrencies: "
        + ", ".join(f"{name} ({', '.join(map(str, levels))})" for name, levels in DOOR_CONCURRENCY.items()),
    )
    parser.add_argument(
        "--cache-row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also run the default server (--backend auto, response cache on) at concurrency {CACHE_ROW_CONCURRENCY}",
    )
    parser.add_argument("--data", type=Path, default=SQUAD_DEV, help="SQuAD-format file (.json or .json.gz)")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--qaserve",
        default=str(Path(sys.executable).with_name("qaserve")),
        help="the qaserve executable to start (default: this Python's console script)",
    )
    parser.add_argument("--server-args", default="", help='extra flags for every server, e.g. "--intra-op-threads 1"')
    remote = parser.add_argument_group("a server started elsewhere (no local servers, no baselines)")
    remote.add_argument("--target", help="HOST:PORT (or dns:///NAME:PORT) of a running qaserve")
    remote.add_argument("--rate", default="", help="open loop at each arrival rate, q/s, comma-separated")
    remote.add_argument("--channels", type=int, default=4, help="gRPC channels (connections) to spread over")
    remote.add_argument("--model", default="", help="the model to ask (default: the server's default)")
    remote.add_argument("--tls", action="store_true", help="TLS, the server checked against the system's roots")
    remote.add_argument("--ca-file", type=Path, help="TLS, the server checked against this CA (PEM)")
    remote.add_argument("--server-name", help="the name the server's certificate must hold (TLS)")
    remote.add_argument("--token-file", type=Path, help="send the bearer token this file holds")
    parser.add_argument(
        "--plot",
        type=Path,
        help="PNG: q/s and p99 against concurrency (local rows); with --target --rate, p50/p99 against the offered "
        "rate (default load.png)",
    )
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.rate = [float(r) for r in args.rate.split(",") if r.strip()]
    if (args.rate and min(args.rate) <= 0) or args.channels < 1:
        parser.error("--rate must be above 0 and --channels at least 1")
    if args.rate and not args.target:
        parser.error("--rate needs --target (the local rows run closed loop)")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(args.backends) - {"torch", "onnx"}:
        parser.error(f"--backends: unknown {', '.join(sorted(unknown))} (torch, onnx)")
    if args.warmup is None:
        args.warmup = min(2.0, args.seconds / 4)
    if min(args.stride, args.rounds, args.context_paragraphs, *args.concurrency) < 1 or (args.limit or 1) < 1:
        parser.error("--stride, --limit, --concurrency, --rounds and --context-paragraphs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    workload = select_workload(load_questions(args.data), args.stride, args.limit, args.context_paragraphs)
    if args.target:
        return target_main(args, argv, workload)
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        workload_file = Path(scratch) / "workload.json"
        workload_file.write_text(json.dumps(workload))
        models = model_dirs(args.models, Path(scratch))
        for model, model_dir in models:
            if not (model_dir / "model.onnx").is_file():
                notes.append(f"{model}: no model.onnx, so no (a') and no onnx rows (`qaserve export` writes one)")
        for round_ in range(1, args.rounds + 1):
            for model, model_dir in models:
                rows += round_rows(args, model, model_dir, workload, workload_file, round_, notes)

    errors = sum(sum(row.errors.values()) for row in rows)
    report = [
        f"qaserve bench: {len(workload)} questions of {args.data.name} (1 in {args.stride}, each with "
        f"{'its own paragraph' if args.context_paragraphs == 1 else f'{args.context_paragraphs} paragraphs'}), "
        f"{args.seconds:g} s per row after {args.warmup:g} s of warm-up, {args.rounds} interleaved round(s)",
        "",
        f"- machine: {machine()}",
        f"- versions: python {platform.python_version()}, qaserve {version('qaserve')} (git {git_commit()}), "
        f"torch {version('torch')}, transformers {version('transformers')}, onnxruntime {version('onnxruntime')}, "
        f"tokenizers {version('tokenizers')}, grpcio {version('grpcio')}, protobuf {version('protobuf')} "
        f"({protobuf_backend()} backend)",
        f"- command: `{command_line(argv)}`",
        *(f"- {note}" for note in notes),
        "- (a), (a'): bench/bare.py in a clean process (no qaserve import, no OMP_/MKL_/QASERVE_ variables), "
        "tokenize + forward one question at a time, answers not decoded. Server rows: `qaserve serve --device cpu` "
        "(and `--response-cache-bytes 0` where the cache is off) in the same clean environment, closed-loop gRPC "
        "clients in this process (HTTP JSON: aiohttp, keep-alive); q/s counts answers. Cells: median (lowest to "
        "highest) over the rounds; ratios taken within each round.",
        "",
        *rounds.table(rows),
        "",
        *rounds.targets(rows),
        *rounds.doors(rows),
        f"- errors: {errors}",
    ]
    if args.plot:
        rounds.write_plot(rows, args.plot, f"qaserve against the bare model, {machine().split(',')[0]}")
        report.append(f"- plot: {args.plot}")
    publish(report, args.markdown)
    return 1 if errors else 0


def round_rows(
    args: argparse.Namespace,
    model: str,
    model_dir: Path,
    workload: list[tuple[str, str]],
    workload_file: Path,
    round_: int,
    notes: list[str],
) -> list[Row]:
    """One round of a model's rows: the bare baselines, then each backend served, then the cached default."""
    has_onnx = (model_dir / "model.onnx").is_file()
    rows = []
    for backend in ["torch", "onnx"] if has_onnx else ["torch"]:
        row, result = run_bare(backend, model, model_dir, workload_file, args.seconds, args.warmup)
        row.round = round_
        rows.append(row)
        progress(row)
        if backend == "torch" and round_ == 1:
            notes.append(
                f"{model}: {result['windows']} windows for {result['questions']} questions, mean "
                f"{result['mean_window_tokens']:.0f} tokens; bare torch on {result['threads']} threads"
            )
    for backend in args.backends:
        if backend != "onnx" or has_onnx:
            rows += server_rows(args, model, model_dir, workload, backend, False, round_)
    if args.cache_row:
        rows += server_rows(args, model, model_dir, workload, "auto", True, round_)
    return rows


def protobuf_backend() -> str:
    """upb, cpp or python: how protobuf messages are parsed and serialized in this process."""
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())


if __name__ == "__main__":
    sys.exit(main())
