"""Servers under test (a `qaserve serve` subprocess, or in-process), their metrics and memory, and the result table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import free_port, in_process_server, tiny_settings, wait_serving

MODEL = "tiny"
SHORT_CONTEXT = "France is a country in Western Europe. Its capital is Paris."
PROBE = pb.AnswerRequest(question="What is the capital of France?", context=SHORT_CONTEXT, top_k=3)

CODES = {code.value[0]: code for code in grpc.StatusCode}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_models_config(path: Path, models: Iterable[tuple[str, Path, bool]], default: str = MODEL) -> Path:
    """A models TOML file: (name, directory, pinned) each; pinned models are preloaded, the others load on use."""
    lines = [f'default = "{default}"', "max_models = 4", ""]
    for name, directory, pinned in models:
        flag = str(pinned).lower()
        lines += ["[[models]]", f'name = "{name}"', f'source = "{directory}"', f"pinned = {flag}", f"preload = {flag}"]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    """The sum of a metric's samples over every label value."""
    return sum(value for (key, _), value in samples.items() if key == name)


class Server:
    """What the suite needs of a server: its address, its /metrics, its memory."""

    target: str
    http_url: str
    metrics_port: int

    async def metrics(self) -> Samples:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        return parse_metrics(await asyncio.to_thread(get))

    def rss_bytes(self) -> int:
        raise NotImplementedError

    async def settled(self, within: float = 15.0) -> Samples:
        """Waits until no window is queued and no RPC is in flight; returns the metrics then (or after `within` s)."""
        until = time.monotonic() + within
        while True:
            samples = await self.metrics()
            busy = total(samples, "qaserve_queue_depth_windows") + total(samples, "qaserve_requests_in_flight")
            if busy == 0 or time.monotonic() > until:
                return samples
            await asyncio.sleep(0.05)


class SubprocessServer(Server):
    """`python -m qaserve.main serve` on free loopback ports; the suite sees it only from outside."""

    def __init__(self, models_config: Path, log_path: Path, **flags: object) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        http_port = free_port()
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.args = [
            sys.executable, "-m", "qaserve.main", "serve", "--models-config", str(models_config),
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--device", "cpu", "--grace-seconds", "2", "--log-level", "WARNING",
            "--response-cache-bytes", "0",  # repeated probes must reach the model path under test
            "--http-port", str(http_port), "--http-read-timeout-seconds", "2",  # slow clients are cut off sooner
        ]  # fmt: skip
        for key, value in flags.items():
            self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, within: float = 120.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(*self.args, stdout=log, stderr=log)
        async with grpc.aio.insecure_channel(self.target) as channel:
            await wait_serving(channel, self.process, within, output=lambda: f"see {self.log_path}")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def rss_bytes(self) -> int:
        assert self.process is not None
        return rss_of(self.process.pid)


class InProcessServer(Server):
    """create_server() in this process, for faults that need a hand inside (a forward pass that raises)."""

    def __init__(self, models_config: Path, **overrides: object) -> None:
        overrides = {"response_cache_bytes": 0, **overrides}  # repeated probes must reach the model path
        self.settings = tiny_settings(Path(), models_config=str(models_config), **overrides)
        self.target = ""
        self.http_url = ""  # HTTP off: the faults are the engine's, whichever door
        self.metrics_port = 0
        self._running = contextlib.AsyncExitStack()

    async def start(self) -> None:
        self.qa_server = await self._running.enter_async_context(in_process_server(self.settings))
        assert self.qa_server.metrics_port is not None
        self.target = f"127.0.0.1:{self.qa_server.port}"
        self.metrics_port = self.qa_server.metrics_port

    async def stop(self) -> None:
        await self._running.aclose()

    def rss_bytes(self) -> int:
        return rss_of(os.getpid())


def rss_of(pid: int) -> int:
    """Resident set size of a process (Linux /proc), 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.asynccontextmanager
async def qa_stub(target: str) -> AsyncIterator[pb_grpc.QuestionAnsweringServiceStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield pb_grpc.QuestionAnsweringServiceStub(channel)


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


def describe_status(code: int | grpc.StatusCode, status: status_pb2.Status | None) -> str:
    """A status in one line: the gRPC code, the ErrorInfo reason where it adds to the code, the BadRequest fields."""
    name = (code if isinstance(code, grpc.StatusCode) else CODES[code]).name
    parts = [name]
    fields: list[str] = []
    for packed in status.details if status is not None else ():
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if packed.Unpack(info) and info.reason != name:
            parts.append(info.reason)
        elif packed.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    if fields:
        parts.append("field " + ",".join(fields))
    return " ".join(parts)


def describe_error(error: grpc.aio.AioRpcError) -> str:
    return describe_status(error.code(), rich_status(error))


async def probe(stub: pb_grpc.QuestionAnsweringServiceStub, reference: pb.AnswerResponse | None = None) -> str:
    """Whether the server still answers, and (given a reference) answers the probe as before: "ok" or why not."""
    try:
        response = await stub.Answer(PROBE, timeout=10)
    except grpc.aio.AioRpcError as error:
        return f"probe failed: {describe_error(error)}"
    if reference is not None and not same_answers(response, reference):
        return "probe answered differently"
    return "ok"


def same_answers(a: pb.AnswerResponse, b: pb.AnswerResponse, tolerance: float = 1e-4) -> bool:
    """Same spans in the same order, scores equal within `tolerance` (batch padding moves the last bits)."""
    return len(a.answers) == len(b.answers) and all(
        (x.answer, x.start, x.end, x.byte_start, x.byte_end) == (y.answer, y.start, y.end, y.byte_start, y.byte_end)
        and abs(x.score - y.score) <= tolerance
        for x, y in zip(a.answers, b.answers, strict=True)
    )


def valid_answers(request: pb.AnswerRequest, response: pb.AnswerResponse) -> bool:
    """Every answer is the context's slice by code points and by UTF-8 bytes."""
    encoded = request.context.encode()
    return bool(response.answers) and all(
        a.answer == request.context[a.start : a.end] and a.answer.encode() == encoded[a.byte_start : a.byte_end]
        for a in response.answers
    )


@dataclass(frozen=True)
class Row:
    """One line of the table. `bug` marks a known server bug: the row is expected to fail until it is fixed."""

    case: str
    expected: str
    observed: str
    passed: bool
    bug: str = ""

    @property
    def verdict(self) -> str:
        if self.bug:
            return "FIXED? drop the bug mark" if self.passed else "no (known bug)"
        return "yes" if self.passed else "NO"

    @property
    def ok(self) -> bool:
        """Fine for the suite: passed, or a known bug still failing."""
        return self.passed != bool(self.bug)


def table(rows: Iterable[Row], markdown: bool = False) -> str:
    """The rows as one table: case, expected, observed, pass."""
    header = ("case", "expected", "observed", "pass")
    lines = [(r.case, r.expected, r.observed, r.verdict) for r in rows]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|---|---|---|---|"]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*x) for x in lines)])
