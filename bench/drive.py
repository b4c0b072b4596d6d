"""Load drivers: closed loop (a fixed number of requests in flight) and open loop (a fixed arrival rate), over
several gRPC channels to one target, plaintext or TLS, with or without a bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from qaserve_client import create_aio_channel, tls_credentials
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

REQUEST_TIMEOUT = 120.0  # seconds; far above any latency of a healthy run, so a slow row shows as latency


class RequestFailed(Exception):
    """An error answer of a door other than gRPC (bench.doors), by its name in the errors column."""


@dataclass(frozen=True)
class Connection:
    """How to reach a server: its target, TLS (a CA file, or the system's roots), a bearer token, a channel count."""

    target: str
    channels: int = 1
    tls: bool = False
    ca_file: Path | None = None
    server_name: str | None = None
    token: str | None = None


@dataclass
class Measured:
    """Answers per second, latencies (s) of the measured answers, errors by gRPC code (warm-up included)."""

    qps: float
    latencies: list[float]
    errors: Counter[str] = field(default_factory=Counter)


def format_errors(errors: Counter[str]) -> str:
    """The errors column: 'CODE n' by code, or 0."""
    return ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "0"


@contextlib.asynccontextmanager
async def stubs(connection: Connection) -> AsyncIterator[list[pb_grpc.QuestionAnsweringServiceStub]]:
    """One stub per channel; each channel its own HTTP/2 connection (a local subchannel pool), so that a Service
    balancing connections spreads them over its pods."""
    credentials = tls_credentials(connection.ca_file) if connection.tls or connection.ca_file else None
    channels = [
        create_aio_channel(
            connection.target,
            credentials=credentials,
            token=connection.token,
            server_name=connection.server_name,
            options=[("grpc.use_local_subchannel_pool", 1)],
        )
        for _ in range(connection.channels)
    ]
    try:
        yield [pb_grpc.QuestionAnsweringServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


Ask = Callable[[Any, Any], Awaitable[object]]
"""One call of a loop: (stub, request) to its answer; the default `answer` sends `request` to the stub's Answer."""


def answer(stub: Any, request: Any) -> Awaitable[object]:
    return stub.Answer(request, timeout=REQUEST_TIMEOUT)


def requests_of(workload: Sequence[tuple[str, str]], model: str = "") -> list[pb.AnswerRequest]:
    return [pb.AnswerRequest(question=q, context=c, model=model) for q, c in workload]


async def _call(ask: Ask, stub: Any, request: Any, since: float, errors: Counter[str]) -> float | None:
    """The latency from `since` (a perf_counter time) to the answer; None, counted in errors, on an error."""
    try:
        await ask(stub, request)
    except grpc.aio.AioRpcError as exc:
        errors[exc.code().name] += 1
        return None
    except RequestFailed as exc:
        errors[str(exc)] += 1
        return None
    return time.perf_counter() - since


async def closed_loop(
    stubs: Sequence[pb_grpc.QuestionAnsweringServiceStub],
    requests: Sequence[Any],
    concurrency: int,
    seconds: float,
    warmup: float,
    ask: Ask = answer,
) -> Measured:
    """`concurrency` in-flight slots, each sending its next question as soon as the previous answer arrives, slot i
    on channel i mod channels; `ask` makes each call (by default the stub's Answer)."""
    errors: Counter[str] = Counter()

    async def slot(index: int, until: float, latencies: list[float]) -> None:
        i = index * len(requests) // concurrency  # slots start spread over the workload
        stub = stubs[index % len(stubs)]
        while time.perf_counter() < until:
            latency = await _call(ask, stub, requests[i % len(requests)], time.perf_counter(), errors)
            if latency is not None:
                latencies.append(latency)
            i += 1

    warm_until = time.perf_counter() + warmup
    await asyncio.gather(*(slot(c, warm_until, []) for c in range(concurrency)))
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(slot(c, started + seconds, latencies) for c in range(concurrency)))
    return Measured(len(latencies) / (time.perf_counter() - started), latencies, errors)


async def closed_loop_to(
    connection: Connection, workload: Sequence[tuple[str, str]], concurrency: int, seconds: float, warmup: float
) -> Measured:
    """closed_loop over fresh channels to `connection`, asking the (question, context) pairs of `workload`."""
    async with stubs(connection) as found:
        return await closed_loop(found, requests_of(workload), concurrency, seconds, warmup)


async def open_loop(
    stubs: Sequence[pb_grpc.QuestionAnsweringServiceStub],
    requests: Sequence[pb.AnswerRequest],
    rate: float,
    seconds: float,
    warmup: float,
) -> Measured:
    """Request i is due at start + i / rate, whatever the answers before it do, round robin over the channels; its
    latency counts from when it was due, so time spent queued behind a slow server (or a late sender) is in it.
    Answers per second: the measured answers over the time from the first due request to the last answer."""
    errors: Counter[str] = Counter()

    async def send(until: float, latencies: list[float]) -> None:
        start = time.perf_counter()
        pending: set[asyncio.Task[float | None]] = set()
        i = 0
        while (due := start + i / rate) < until:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            stub, request = stubs[i % len(stubs)], requests[i % len(requests)]
            pending.add(asyncio.create_task(_call(answer, stub, request, due, errors)))
            i += 1
        latencies += [latency for latency in await asyncio.gather(*pending) if latency is not None]

    await send(time.perf_counter() + warmup, [])
    latencies: list[float] = []
    started = time.perf_counter()
    await send(started + seconds, latencies)
    return Measured(len(latencies) / (time.perf_counter() - started), latencies, errors)
