"""The reader against fan-out: one Read over a question's passages vs one Answer per passage, all at once.

Workload: SQuAD v1.1 dev questions, every 35th one (as make bench), each with its own paragraph and 9 others of
its article (bench/evaldata.load_reader_questions), over gRPC against one `qaserve serve` (the defaults of
`make run`, response cache off). For each question, either

  read     one Read call carrying all 10 passages (every window in shared forward passes), or
  fan-out  10 Answer calls, one per passage, sent concurrently, then the best answer picked by the client,

closed-loop at concurrency 1 and 8 (questions in flight). Each row: questions per second and per-question latency
(the Read call, or the last of the 10 Answers); the ratio column compares Read with fan-out at the same
concurrency.

    make bench-reader                               # about 2 minutes
    make bench-reader ARGS="--seconds 5 --limit 50"
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import drive
from bench.bare import percentile
from bench.drive import REQUEST_TIMEOUT
from bench.evaldata import SQUAD_DEV, ReaderQuestion, load_reader_questions
from bench.load import EMBEDDED, ServerProcess
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

CONCURRENCY = (1, 8)
PASSAGES = 10
STRIDE = 35


@dataclass(frozen=True)
class Row:
    way: str  # read | fan-out
    concurrency: int
    qps: float
    p50_ms: float
    p95_ms: float
    errors: Counter[str]


Ask = Callable[[pb_grpc.QuestionAnsweringServiceStub, ReaderQuestion], Awaitable[object]]


async def read(stub: pb_grpc.QuestionAnsweringServiceStub, question: ReaderQuestion) -> object:
    passages = [pb.Passage(text=text) for text in question.passages]
    request = pb.ReadRequest(question=question.question.question, passages=passages)
    return await stub.Read(request, timeout=REQUEST_TIMEOUT)


async def fan_out(stub: pb_grpc.QuestionAnsweringServiceStub, question: ReaderQuestion) -> object:
    requests = [pb.AnswerRequest(question=question.question.question, context=text) for text in question.passages]
    answers = await asyncio.gather(*(stub.Answer(r, timeout=REQUEST_TIMEOUT) for r in requests))
    return max((response.answers[0] for response in answers), key=lambda answer: answer.score)


async def closed_loop(
    target: str, ask: Ask, questions: Sequence[ReaderQuestion], concurrency: int, seconds: float, warmup: float
) -> tuple[float, list[float], Counter[str]]:
    """bench.drive's closed loop over one channel, asking questions with `ask`; returns questions per second,
    latencies (s) of the measured questions, and errors by gRPC code."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        measured = await drive.closed_loop([stub], questions, concurrency, seconds, warmup, ask)
    return measured.qps, measured.latencies, measured.errors


def table(rows: Sequence[Row]) -> list[str]:
    """The rows as markdown; each compared with the fan-out row measured with it (rows come in read, fan-out
    pairs, so a repeated concurrency compares within its own pair)."""
    partner = {id(row): fan_out for row, fan_out in zip(rows[::2], rows[1::2], strict=True)}
    partner.update({id(row): row for row in rows[1::2]})
    lines = [
        "| way | concurrency | questions/s | p50 ms | p95 ms | q/s vs fan-out | p50 vs fan-out | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = partner.get(id(row))
        ratio = f"{row.qps / base.qps:.2f}x" if base is not None and base.qps else "-"
        latency = f"{row.p50_ms / base.p50_ms:.2f}x" if base is not None and base.p50_ms else "-"
        lines.append(
            f"| {row.way} | {row.concurrency} | {row.qps:.2f} | {row.p50_ms:.0f} | {row.p95_ms:.0f} | {ratio} | "
            f"{latency} | {drive.format_errors(row.errors)} |"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=EMBEDDED, help="model directory (default: the embedded model)")
    parser.add_argument("--data", type=Path, default=SQUAD_DEV, help="SQuAD-format file, .json or .json.gz")
    parser.add_argument("--stride", type=int, default=STRIDE, help="every Nth question of the file")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per row before measuring")
    parser.add_argument("--limit", type=int, default=None, help="at most N questions")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--qaserve", default=str(Path(sys.executable).with_name("qaserve")), help="the server command")
    parser.add_argument("--server-args", default="", help="more `qaserve serve` flags, one string")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    questions = load_reader_questions(args.data, PASSAGES)[:: args.stride][: args.limit]
    server = ServerProcess(args.qaserve, args.model, args.model.name, "auto", False, shlex.split(args.server_args))
    rows = []
    try:
        asyncio.run(server.ready())
        for concurrency in args.concurrency:
            for way, ask in (("read", read), ("fan-out", fan_out)):
                qps, latencies, errors = asyncio.run(
                    closed_loop(server.target, ask, questions, concurrency, args.seconds, args.warmup)
                )
                ms = [s * 1e3 for s in latencies] or [float("nan")]
                row = Row(way, concurrency, qps, percentile(ms, 0.5), percentile(ms, 0.95), errors)
                print(f"{way} at {concurrency}: {qps:.2f} questions/s, p50 {row.p50_ms:.0f} ms", file=sys.stderr)
                rows.append(row)
    finally:
        server.stop()
    passages = sum(len(q.passages) for q in questions) / max(1, len(questions))
    print(f"{len(questions)} questions, {passages:.1f} passages each, {args.model.name}, cache off")
    print("\n".join(table(rows)))
    return 1 if any(row.errors for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
