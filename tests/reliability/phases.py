"""The traffic phases: sustained load, a cancellation storm, and requests whose deadline is shorter than their work."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import statistics
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2

from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from .harness import (
    MODEL,
    PROBE,
    Row,
    Samples,
    Server,
    describe_error,
    probe,
    qa_stub,
    rich_status,
    same_answers,
    sample,
    total,
    valid_answers,
)


@dataclass(frozen=True)
class Config:
    """Sizes of one run. FULL is `make reliability`; CI is what pytest runs."""

    requests: int = 20_000
    concurrency: int = 64
    max_in_flight: int = 64  # the server's admission bound; the overload case sends 4x as many at once
    cancellations: int = 1_000
    deadline_requests: int = 50
    rss_tolerance: float = 0.05
    # A phase that has not finished by then stops and fails; load gets longer on a machine measured slower.
    seconds_per_phase: float = 300.0


FULL = Config()
MAX_ATTEMPTS = 20  # per request, under load, when the server answers RESOURCE_EXHAUSTED
CI = Config(
    requests=600, concurrency=16, max_in_flight=16, cancellations=150, deadline_requests=8, seconds_per_phase=45
)

PLACES = ("Zürich", "Ålesund", "São Paulo", "Kraków", "Reykjavík", "Paris", "Nairobi", "Montréal", "Kyoto", "Lima")
NAMES = ("José Núñez", "Zoë Brontë", "Chloé Dubois", "Ana Łukasik", "Björn Sæther", "Ada Lovelace", "Omar Haddad")
THINGS = ("library", "bridge", "café 🍰", "observatory", "river port", "market", "museum", "railway 🚂", "theatre")


def sentence(rng: random.Random) -> str:
    return (
        f"The {rng.choice(THINGS)} of {rng.choice(PLACES)} was opened in {rng.randint(1700, 2024)} "
        f"by {rng.choice(NAMES)}, and it serves {rng.randint(2, 900)} visitors a day."
    )


def context_of(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def request_pool(seed: int = 0, size: int = 64) -> list[pb.AnswerRequest]:
    """Mixed context lengths: half one sentence, then ~1, ~3 and ~10 windows of 384 tokens (non-ASCII throughout)."""
    rng = random.Random(seed)
    pool = []
    for i in range(size):
        sentences = rng.choices((1, 12, 40, 140), weights=(50, 30, 15, 5))[0]
        question = f"Who opened the {rng.choice(THINGS)} of {rng.choice(PLACES)}?"
        pool.append(pb.AnswerRequest(question=question, context=context_of(rng, sentences), top_k=1 + i % 3))
    return pool


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED error, None when it has none."""
    status = rich_status(error)
    for packed in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if packed.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


# -- load -----------------------------------------------------------------------------------------------------------


async def load(server: Server, config: Config) -> Row:
    """`config.requests` requests from `config.concurrency` closed-loop Answer clients over a pool of mixed lengths.

    An attempt that gets RESOURCE_EXHAUSTED (the server admits `max_in_flight` at once) waits its RetryInfo delay
    and tries again, up to MAX_ATTEMPTS times. Every request must end answered (exactly as the same request alone)
    or, out of attempts, RESOURCE_EXHAUSTED; any other status fails the row."""
    pool = request_pool()
    outcomes: collections.Counter[str] = collections.Counter()
    rejections = 0
    latencies: list[float] = []
    async with qa_stub(server.target) as stub:
        alone = time.perf_counter()
        reference = [await stub.Answer(request, timeout=60) for request in pool]
        alone = time.perf_counter() - alone
        rss_before = server.rss_bytes()
        next_index = itertools.count()
        started = time.perf_counter()
        # Three times the requests' time one at a time, as the pool ran just now: a busy machine gets the time its
        # measured pace needs (with room to get busier still), where a fixed limit would cut the phase short.
        until = started + max(config.seconds_per_phase, 3 * alone * config.requests / len(pool))

        async def attempt(request: pb.AnswerRequest) -> pb.AnswerResponse | str:
            nonlocal rejections
            for _ in range(MAX_ATTEMPTS):
                try:
                    return await stub.Answer(request, timeout=30)
                except grpc.aio.AioRpcError as error:
                    delay = retry_delay(error) if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                    if delay is None:
                        return describe_error(error)
                    rejections += 1
                    await asyncio.sleep(delay)
            return "RESOURCE_EXHAUSTED"

        async def client() -> None:
            while (i := next(next_index)) < config.requests and time.perf_counter() < until:
                request = pool[i % len(pool)]
                t0 = time.perf_counter()
                response = await attempt(request)
                if isinstance(response, str):
                    outcomes[response] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                good = valid_answers(request, response) and same_answers(response, reference[i % len(pool)])
                outcomes["OK" if good else "wrong answers"] += 1

        await asyncio.gather(*(client() for _ in range(config.concurrency)))
        elapsed = time.perf_counter() - started
        await server.settled()
        rss_after = server.rss_bytes()

    ended = sum(outcomes.values())
    others = {k: v for k, v in outcomes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    p50 = statistics.median(latencies) if latencies else 0.0
    p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))] if latencies else 0.0
    observed = (
        f"{ended} ended: {outcomes['OK']} OK, {outcomes['RESOURCE_EXHAUSTED']} RESOURCE_EXHAUSTED, "
        f"{sum(others.values())} other{' ' + str(others) if others else ''} "
        f"({rejections} retried attempts); {ended / elapsed:.0f} req/s, "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; server RSS {mb(rss_before)} -> {mb(rss_after)}"
    )
    return Row(
        f"load: {config.requests} Answer requests, concurrency {config.concurrency}, mixed context lengths, "
        f"--max-in-flight {config.max_in_flight}",
        "each answered as when alone, or RESOURCE_EXHAUSTED + RetryInfo; no other status",
        observed,
        ended == config.requests and not others and outcomes["OK"] > 0,
    )


async def overload(server: Server, config: Config) -> Row:
    """4 x `max_in_flight` multi-window Answer calls at once: those over the bound get RESOURCE_EXHAUSTED with a
    RetryInfo delay, right away; the others are answered; nothing else happens, and the server answers after."""
    request = pb.AnswerRequest(question="Who opened the market of Kyoto?", context=context_of(random.Random(5), 40))
    async with qa_stub(server.target) as stub:

        async def one() -> str:
            try:
                response = await stub.Answer(request, timeout=60)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    delay = retry_delay(error)
                    return "RESOURCE_EXHAUSTED + RetryInfo" if delay else "RESOURCE_EXHAUSTED without RetryInfo"
                return describe_error(error)
            return "OK" if valid_answers(request, response) else "wrong answers"

        calls = 4 * config.max_in_flight
        outcomes = collections.Counter(await asyncio.gather(*(one() for _ in range(calls))))
        await server.settled()
        after = await probe(stub)
    others = set(outcomes) - {"OK", "RESOURCE_EXHAUSTED + RetryInfo"}
    return Row(
        f"overload: {calls} multi-window Answer calls at once, --max-in-flight {config.max_in_flight}",
        "those over the bound RESOURCE_EXHAUSTED + RetryInfo, the rest OK; next request OK",
        f"{summary_of(outcomes)}; next request {after}",
        outcomes["OK"] >= config.max_in_flight
        and outcomes["RESOURCE_EXHAUSTED + RetryInfo"] > 0
        and not others
        and after == "ok",
    )


# -- cancellation storm ---------------------------------------------------------------------------------------------


async def cancellation_storm(server: Server, config: Config) -> Row:
    """`config.cancellations` calls (Answer, AnswerProgressive, AnswerMany) on multi-window contexts, each cancelled
    by its client after a random delay. Afterwards nothing is queued or in flight, memory is back, answers agree."""
    rng = random.Random(1)
    texts = [context_of(rng, n) for n in (12, 40, 80, 140)]
    requests = [
        pb.AnswerRequest(question="Who opened the market?", context=text, max_seq_len=max_seq_len, top_k=3)
        for text in texts
        for max_seq_len in (64, 128, 384)
    ]
    async with qa_stub(server.target) as stub:
        reference = await stub.Answer(PROBE, timeout=30)
        # The same storm first, so the baseline includes what it allocates once: the cancellation paths, and each
        # replica's arena growing to the largest batch it runs (a storm a tenth the size left +5.5-6.3% to that; after
        # a full one, a second grew 0.3-0.4%).
        await storm(stub, requests, config.cancellations, config.concurrency, random.Random(2))
        await server.settled()
        rss_before = server.rss_bytes()
        started = time.perf_counter()
        outcomes = await asyncio.wait_for(
            storm(stub, requests, config.cancellations, config.concurrency, random.Random(3)),
            config.seconds_per_phase,
        )
        elapsed = time.perf_counter() - started
        samples = await server.settled()
        rss_after = server.rss_bytes()
        answers = await probe(stub, reference)

    depth = sample(samples, "qaserve_queue_depth_windows", model=MODEL)
    in_flight = total(samples, "qaserve_requests_in_flight")
    growth = (rss_after - rss_before) / rss_before if rss_before else 0.0
    unexpected = {k: v for k, v in outcomes.items() if k not in ("cancelled", "finished first", "RESOURCE_EXHAUSTED")}
    observed = (
        f"{outcomes['cancelled']} cancelled, {outcomes['finished first']} finished first, "
        f"{outcomes['RESOURCE_EXHAUSTED']} RESOURCE_EXHAUSTED{', other ' + str(unexpected) if unexpected else ''} "
        f"in {elapsed:.1f}s; queue depth {depth:.0f}, in flight {in_flight:.0f}; "
        f"RSS {mb(rss_before)} -> {mb(rss_after)} ({growth:+.1%}); probe {answers}"
    )
    return Row(
        f"cancellation storm: {config.cancellations} calls cancelled at random points",
        f"queue depth 0, nothing in flight, RSS within {config.rss_tolerance:.0%}, same answers after",
        observed,
        depth == 0
        and in_flight == 0
        and abs(growth) <= config.rss_tolerance
        and answers == "ok"
        and not unexpected
        and outcomes["cancelled"] > 0,
    )


async def storm(
    stub: pb_grpc.QuestionAnsweringServiceStub,
    requests: list[pb.AnswerRequest],
    count: int,
    concurrency: int,
    rng: random.Random,
) -> collections.Counter[str]:
    outcomes: collections.Counter[str] = collections.Counter()
    slots = asyncio.Semaphore(concurrency)

    async def one(kind: str, request: pb.AnswerRequest, delay: float) -> None:
        async with slots:
            outcomes[await cancel_after(stub, kind, request, delay)] += 1

    plan = [
        (rng.choice(("unary", "progressive", "many")), rng.choice(requests), rng.uniform(0, 0.25)) for _ in range(count)
    ]
    await asyncio.gather(*(one(*item) for item in plan))
    return outcomes


async def cancel_after(
    stub: pb_grpc.QuestionAnsweringServiceStub, kind: str, request: pb.AnswerRequest, delay: float
) -> str:
    """Starts a call, lets it run for `delay` seconds (reading what arrives), cancels it; how it ended."""
    if kind == "unary":
        call: Any = stub.Answer(request, timeout=30)
    elif kind == "progressive":
        call = stub.AnswerProgressive(pb.AnswerProgressiveRequest(request=request), timeout=30)
    else:
        items = (pb.AnswerManyRequest(id=str(i), request=request) for i in range(3))
        call = stub.AnswerMany(items, timeout=30)

    async def drain() -> None:
        if kind == "unary":
            await call
        else:
            async for _ in call:
                pass

    reader = asyncio.create_task(drain())
    done, _ = await asyncio.wait({reader}, timeout=delay)
    if not done:
        call.cancel()
    try:
        await reader
    except asyncio.CancelledError:
        return "cancelled"
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.CANCELLED:
            return "cancelled"
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "RESOURCE_EXHAUSTED"
        return describe_error(error)
    return "finished first"


# -- deadlines ------------------------------------------------------------------------------------------------------


async def deadlines(server: Server, config: Config) -> list[Row]:
    """Requests whose deadline is shorter than their work end DEADLINE_EXCEEDED and their windows never run
    (the windows the model ran, qaserve_batch_windows_sum, grow by nothing of theirs). Each deadline is a fraction
    of the time the same work took without one, measured three times: the fastest run where the deadline must pass
    before the work is done, so the cases hold on fast and slow machines alike, and on one whose load changes."""
    rng = random.Random(4)
    n = config.deadline_requests
    rows = []
    async with qa_stub(server.target) as stub:
        # 1. An idle server, and a context whose tokenizing alone outlasts the deadline.
        huge = pb.AnswerRequest(question="Who opened it?", context=context_of(rng, 1000), max_seq_len=32, doc_stride=8)
        deadline = min(t.tokenize_seconds for t in await timings(stub, huge)) / 4
        before = await server.settled()
        codes = await asyncio.gather(*(outcome(stub.Answer(huge, timeout=deadline)) for _ in range(n)))
        ran = windows_run(await server.settled()) - windows_run(before)
        rows.append(
            Row(
                f"deadline {deadline * 1000:.0f} ms (1/4 of tokenizing), idle server (x{n})",
                "DEADLINE_EXCEEDED; 0 windows run",
                f"{summary(codes)}; {ran:.0f} windows run",
                set(codes) == {"DEADLINE_EXCEEDED"} and ran == 0,
            )
        )

        # 2. Short requests queued behind a long one, with deadlines that pass before the long one is done. Its
        # windows overlap much (doc_stride 320 of 384), so running them takes several times its tokenizing and the
        # short requests, sent once it is queued, have most of its run for their deadlines to pass.
        long = pb.AnswerRequest(
            question="Who opened it?", context=context_of(rng, 1000), max_seq_len=384, doc_stride=320
        )
        short = pb.AnswerRequest(question="Who opened the museum?", context=context_of(rng, 3))
        measured = await timings(stub, long)
        work = min(t.queue_seconds + t.forward_seconds for t in measured)
        deadline = work / 4
        before = await server.settled()
        blocking = asyncio.ensure_future(stub.Answer(long, timeout=120))
        await queued(server)
        codes = await asyncio.gather(*(outcome(stub.Answer(short, timeout=deadline)) for _ in range(n)))
        blocker_windows = (await blocking).windows
        ran = windows_run(await server.settled()) - windows_run(before)
        rows.append(
            Row(
                f"deadline {deadline * 1000:.0f} ms, queued behind a {blocker_windows}-window request (x{n})",
                f"DEADLINE_EXCEEDED; only the long request's {blocker_windows} windows run",
                f"{summary(codes)}; {ran:.0f} windows run; long request OK",
                set(codes) == {"DEADLINE_EXCEEDED"} and ran == blocker_windows,
            )
        )

        # 3. A progressive stream of the long request whose deadline passes mid-way: the windows not yet run are
        # dropped. Its windows take several times its tokenizing, so the deadline falls among them even when
        # tokenizing takes a few times its usual time.
        deadline = statistics.median(t.tokenize_seconds for t in measured) + work / 2
        before = await server.settled()
        call = stub.AnswerProgressive(pb.AnswerProgressiveRequest(request=long), timeout=deadline)
        windows, code = 0, "OK"
        try:
            async for message in call:
                if message.HasField("partial"):
                    windows = message.partial.windows_total
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        ran = windows_run(await server.settled()) - windows_run(before)
        rows.append(
            Row(
                f"AnswerProgressive, deadline {deadline * 1000:.0f} ms (half its work), {windows} windows",
                "partials, then DEADLINE_EXCEEDED; the remaining windows never run",
                f"{code}; {ran:.0f} of {windows} windows run",
                code == "DEADLINE_EXCEEDED" and 0 < ran < windows,
            )
        )
        answers = await probe(stub)
        rows.append(Row("after the deadline cases", "the next request is answered", answers, answers == "ok"))
    return rows


async def timings(
    stub: pb_grpc.QuestionAnsweringServiceStub, request: pb.AnswerRequest, runs: int = 3
) -> list[pb.ServerTiming]:
    """The server's timing of `request` (tokenize, queue, forward seconds) in `runs` runs one after another."""
    return [(await stub.Answer(request, timeout=120)).timing for _ in range(runs)]


async def outcome(call: Awaitable[object]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return str(error.code().name)
    return "OK"


def summary(codes: list[str]) -> str:
    return summary_of(collections.Counter(codes))


def summary_of(outcomes: collections.Counter[str]) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in outcomes.most_common())


def windows_run(samples: Samples) -> float:
    return sample(samples, "qaserve_batch_windows_sum", model=MODEL)


async def queued(server: Server, within: float = 30.0) -> None:
    """Waits until the model's queue holds windows."""
    until = time.monotonic() + within
    while sample(await server.metrics(), "qaserve_queue_depth_windows", model=MODEL) == 0:
        if time.monotonic() > until:
            raise TimeoutError("nothing was queued")
        await asyncio.sleep(0.005)
