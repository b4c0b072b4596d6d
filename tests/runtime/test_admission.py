"""QAEngine admission: at most max_in_flight answers and streams at once, the rest Overloaded with a retry hint."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from qaserve.api.errors import ERROR_DOMAIN, error_status
from qaserve.errors import InvalidArgument, ModelNotFound, ModelNotReady, Overloaded
from qaserve.metrics import Metrics
from qaserve.qa import QARequest
from qaserve.runtime.engine import QAEngine
from qaserve.runtime.registry import ModelRegistry
from qaserve.runtime.spec import ModelSpec

from qaserve_testing import PATIENCE, eventually

RETRY_AFTER = 0.25
REQUEST = QARequest(question="Who wrote it?", context="It was written by Ada.")


class GatedRegistry:
    """Stands in for ModelRegistry: get() holds each admitted request until the gate opens, then fails it.

    Holding requests inside get() keeps them in flight without any model; failing them afterwards ends them
    without one either.
    """

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0

    def spec(self, name: str) -> ModelSpec:
        return ModelSpec(name or "default", "/models/default")

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[object]:
        self.calls += 1
        await self.gate.wait()
        raise ModelNotReady("the stub registry serves no model")
        yield


@dataclass
class Rig:
    engine: QAEngine
    registry: GatedRegistry
    metrics: CollectorRegistry
    tasks: list[asyncio.Task[object]] = field(default_factory=list)

    def start(self) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.create_task(self.engine.answer(REQUEST))
        self.tasks.append(task)
        return task

    async def release(self) -> None:
        """Lets every held request finish (failing in the stub registry)."""
        self.registry.gate.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), PATIENCE)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.fixture
async def rig(executor: ThreadPoolExecutor) -> AsyncIterator[Rig]:
    registry = GatedRegistry()
    metrics = CollectorRegistry()
    engine = QAEngine(
        cast(ModelRegistry, registry),
        executor=executor,
        metrics=Metrics(metrics),
        max_in_flight=2,
        retry_after=RETRY_AFTER,
    )
    rig = Rig(engine, registry, metrics)
    yield rig
    await rig.release()


async def fill(rig: Rig) -> list[asyncio.Task[object]]:
    """Admits max_in_flight requests and leaves them waiting in the registry."""
    tasks = [rig.start() for _ in range(rig.engine.max_in_flight)]
    await eventually(lambda: rig.registry.calls == len(tasks), "the requests to be admitted")
    assert rig.engine.in_flight == len(tasks)
    return tasks


async def test_request_beyond_max_in_flight_is_overloaded(rig: Rig) -> None:
    await fill(rig)

    with pytest.raises(Overloaded) as caught:
        await rig.engine.answer(REQUEST)

    assert caught.value.retry_after == RETRY_AFTER > 0
    assert rig.registry.calls == 2  # the refused request never reached the model
    assert rig.engine.in_flight == 2


async def test_requests_are_admitted_again_once_in_flight_ones_finish(rig: Rig) -> None:
    held = await fill(rig)
    with pytest.raises(Overloaded):
        await rig.engine.answer(REQUEST)

    await rig.release()

    assert all(isinstance(task.exception(), ModelNotReady) for task in held)
    assert rig.engine.in_flight == 0
    for _ in range(3):  # more than max_in_flight in a row: each slot is given back
        with pytest.raises(ModelNotReady):
            await asyncio.wait_for(rig.engine.answer(REQUEST), PATIENCE)
    assert rig.registry.calls == 5


async def test_cancelled_request_gives_its_slot_back(rig: Rig) -> None:
    held = await fill(rig)

    held[0].cancel()
    await asyncio.wait([held[0]])
    assert rig.engine.in_flight == 1
    rig.start()
    await eventually(lambda: rig.registry.calls == 3, "the new request to be admitted")

    assert rig.engine.in_flight == 2
    await rig.release()
    assert rig.engine.in_flight == 0


async def test_request_failing_before_the_model_gives_its_slot_back(executor: ThreadPoolExecutor) -> None:
    class UnknownModels:
        def spec(self, name: str) -> ModelSpec:
            raise ModelNotFound(name)

        @contextlib.asynccontextmanager
        async def use(self, name: str) -> AsyncIterator[object]:
            raise ModelNotFound(name)
            yield

    engine = QAEngine(
        cast(ModelRegistry, UnknownModels()), executor=executor, metrics=Metrics(CollectorRegistry()), max_in_flight=1
    )

    for _ in range(3):
        with pytest.raises(ModelNotFound):
            await engine.answer(QARequest(question="q?", context="c", model="missing"))

    assert engine.in_flight == 0


async def test_invalid_request_is_refused_as_invalid_even_when_full(rig: Rig) -> None:
    await fill(rig)

    with pytest.raises(InvalidArgument) as caught:
        await rig.engine.answer(QARequest(question="   ", context="some context"))

    assert caught.value.field == "question"


def to_status(error: Exception) -> grpc.Status:
    return rpc_status.to_status(error_status(error, None, "test").status)


def details_of(status: grpc.Status) -> status_pb2.Status:
    metadata = dict(status.trailing_metadata)
    return status_pb2.Status.FromString(metadata["grpc-status-details-bin"])


def test_overloaded_maps_to_resource_exhausted_with_retry_info() -> None:
    status = to_status(Overloaded("the server is busy; retry shortly", RETRY_AFTER))

    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.details == "the server is busy; retry shortly"
    rich = details_of(status)
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert rich.message == status.details
    by_type = {detail.TypeName(): detail for detail in rich.details}
    assert sorted(by_type) == ["google.rpc.ErrorInfo", "google.rpc.RetryInfo"]
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    assert by_type["google.rpc.ErrorInfo"].Unpack(info)
    assert by_type["google.rpc.RetryInfo"].Unpack(retry)
    assert info.reason == "OVERLOADED"
    assert info.domain == ERROR_DOMAIN
    assert retry.retry_delay.ToNanoseconds() == int(RETRY_AFTER * 1e9)


async def test_engine_refusal_carries_the_engines_retry_delay(rig: Rig) -> None:
    await fill(rig)
    with pytest.raises(Overloaded) as caught:
        await rig.engine.answer(REQUEST)

    rich = details_of(to_status(caught.value))

    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in rich.details)
    assert retry.retry_delay.ToNanoseconds() == int(RETRY_AFTER * 1e9)


async def test_progressive_streams_are_admitted_like_answers(rig: Rig) -> None:
    await fill(rig)

    with pytest.raises(Overloaded):
        await anext(rig.engine.answer_progressive(REQUEST))

    assert rig.registry.calls == 2


async def test_a_stream_cancelled_while_waiting_gives_its_slot_back(rig: Rig) -> None:
    stream = rig.engine.answer_progressive(REQUEST)
    step = asyncio.ensure_future(anext(stream))
    await eventually(lambda: rig.registry.calls == 1, "the stream to be admitted")
    assert rig.engine.in_flight == 1

    step.cancel()
    await asyncio.wait([step])
    await stream.aclose()

    assert rig.engine.in_flight == 0
