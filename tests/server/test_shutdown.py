"""Graceful shutdown: SIGTERM turns health NOT_SERVING, the drain keeps serving, nothing accepted is lost."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qaserve.main import run_loop
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import (
    SEED_QUESTION,
    free_port,
    http_request,
    in_process_server,
    start_qaserve,
    tiny_settings,
    wait_serving,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A few windows per request, so the burst keeps the server busy for a while.
LONG_CONTEXT = " ".join(f"Paris is the capital of France and sentence {i} says so." for i in range(120))
# Retries off: a request the server dropped must show as a failure, not be answered by a second attempt.
NO_RETRIES = [("grpc.enable_retries", 0)]


class HealthWatch:
    """Everything one Health.Watch stream reports, until the server ends it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.statuses: list[int] = []
        self.changed = asyncio.Condition()
        self._call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for reply in self._call:
                async with self.changed:
                    self.statuses.append(reply.status)
                    self.changed.notify_all()
        except grpc.aio.AioRpcError as error:
            # The stream may end with the connection rather than with the server's OK.
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error

    async def reaches(self, status: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: status in self.statuses), 30)


async def answer(stub: pb_grpc.QuestionAnsweringServiceStub) -> str:
    response = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=LONG_CONTEXT), timeout=60)
    return response.model.name


@pytest.fixture
async def server_process(tiny_model_dir: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`qaserve serve` on the tiny model in a process of its own; yields (process, target)."""
    port = free_port()
    process = await start_qaserve(
        "serve",
        *("--model", str(tiny_model_dir), "--model-name", "tiny", "--device", "cpu", "--intra-op-threads", "1"),
        *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
        *("--drain-seconds", "2", "--grace-seconds", "30", "--log-format", "json"),
    )
    try:
        yield process, f"127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_during_a_burst_answers_all_50_and_exits_0(
    server_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    process, target = server_process
    async with grpc.aio.insecure_channel(target, options=NO_RETRIES) as channel:
        await wait_serving(channel, process)
        watch = HealthWatch(channel)
        await watch.reaches(SERVING)
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)

        before = [asyncio.create_task(answer(stub)) for _ in range(25)]
        await asyncio.sleep(0.05)  # the burst is on the wire
        process.send_signal(signal.SIGTERM)
        await watch.reaches(NOT_SERVING)
        # Health says NOT_SERVING, and the drain still serves what load balancers have not yet moved elsewhere.
        after = [asyncio.create_task(answer(stub)) for _ in range(25)]

        answers = await asyncio.gather(*before, *after)
        assert answers == ["tiny"] * 50
        assert await asyncio.wait_for(process.wait(), 60) == 0
        await asyncio.wait_for(watch.task, 10)  # the server ended the stream
    assert watch.statuses[:2] == [SERVING, NOT_SERVING]

    assert process.stderr is not None
    log = [json.loads(line) for line in (await process.stderr.read()).decode().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in log]
    assert any(m.startswith("SIGTERM: health NOT_SERVING") for m in messages), messages
    assert messages[-1] == "stopped"
    assert any(m.startswith("settings: ") for m in messages)


async def test_drain_serves_new_requests_and_stop_ends_watch_streams(tiny_model_dir: Path) -> None:
    # A grace far longer than the test may take: stop() must not wait for it while only Watch streams are open.
    async with (
        in_process_server(tiny_settings(tiny_model_dir, grace_seconds=120)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=NO_RETRIES) as channel,
    ):
        watch = HealthWatch(channel)
        await watch.reaches(SERVING)
        cut_short = asyncio.Event()
        draining = asyncio.create_task(server.drain(60, cut_short=cut_short))
        await watch.reaches(NOT_SERVING)
        assert await answer(pb_grpc.QuestionAnsweringServiceStub(channel)) == "tiny"
        cut_short.set()
        await asyncio.wait_for(draining, 10)
        await asyncio.wait_for(server.stop(), 30)
        await asyncio.wait_for(watch.task, 10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await answer(pb_grpc.QuestionAnsweringServiceStub(channel))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_sigterm_drains_http_as_grpc_health_503_while_requests_are_answered(tiny_model_dir: Path) -> None:
    port, http_port = free_port(), free_port()
    process = await start_qaserve(
        "serve",
        *("--model", str(tiny_model_dir), "--model-name", "tiny", "--device", "cpu", "--intra-op-threads", "1"),
        *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--http-port", str(http_port)),
        *("--drain-seconds", "3", "--grace-seconds", "30"),
    )
    url = f"http://127.0.0.1:{http_port}"
    body = {"question": SEED_QUESTION, "context": LONG_CONTEXT}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_RETRIES) as channel:
            await wait_serving(channel, process)
        assert (await http_request(f"{url}/health")).status == 200
        before = [asyncio.create_task(http_request(f"{url}/v1/answer", body)) for _ in range(10)]
        await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        statuses = [(await http_request(f"{url}/health")).status]
        for _ in range(100):  # health turns 503 within moments of the signal
            if statuses[-1] != 200:
                break
            await asyncio.sleep(0.05)
            statuses.append((await http_request(f"{url}/health")).status)
        assert statuses[-1] == 503 and (await http_request(f"{url}/v2/health/ready")).status == 503
        during = await http_request(f"{url}/v1/answer", body)
        assert during.status == 200 and during.json()["model"]["name"] == "tiny"
        assert [r.status for r in await asyncio.gather(*before)] == [200] * 10
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_process_runs_on_uvloop_where_it_is_installed() -> None:
    async def on_uvloop() -> int:
        return int(type(asyncio.get_running_loop()).__module__.startswith("uvloop"))

    assert run_loop(on_uvloop()) == 1  # uvloop is a dependency on every platform but Windows
