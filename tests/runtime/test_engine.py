"""Engine streams on a tiny model: closed early, cancelled, abandoned or stopped, they leave no task behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from qaserve.errors import ShuttingDown
from qaserve.metrics import Metrics
from qaserve.qa import QAParams, QAProgress, QARequest, QAResult
from qaserve.runtime import ModelRegistry, QAEngine
from qaserve.runtime.spec import ModelSpec

PATIENCE = 5.0
DESTROYED = "Task was destroyed but it is pending!"
LONG = " ".join(f"Line {i}: the river number {i} flows into lake {i % 7} near the town of Ålesund." for i in range(60))
# Small windows and batches, so a stream has many steps to stop in the middle of.
REQUEST = QARequest("Which lake does river 42 flow into?", LONG, params=QAParams(max_seq_len=64, doc_stride=16))


class PendingTaskGuard:
    """Records what the loop reports about tasks garbage-collected while still pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.destroyed: list[str] = []
        self._previous = loop.get_exception_handler()

    def __enter__(self) -> PendingTaskGuard:
        self.loop.set_exception_handler(self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.set_exception_handler(self._previous)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == DESTROYED:
            self.destroyed.append(repr(context.get("task")))
        elif self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


@pytest.fixture
async def no_pending_tasks() -> AsyncIterator[PendingTaskGuard]:
    """Fails the test if any task is destroyed while pending, up to a full garbage collection at its end."""
    with PendingTaskGuard(asyncio.get_running_loop()) as guard:
        yield guard
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
    assert guard.destroyed == []


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture
async def engine(tiny_model_dir: Path, executor: ThreadPoolExecutor) -> AsyncIterator[QAEngine]:
    metrics = Metrics(CollectorRegistry())
    models = ModelRegistry([ModelSpec("tiny", str(tiny_model_dir), device="cpu", max_batch_windows=2)], "tiny", metrics)
    await models.preload()
    yield QAEngine(models, executor=executor, metrics=metrics)
    await models.close()


def queued(engine: QAEngine) -> int:
    serving = engine.registry.loaded("tiny")
    assert serving is not None
    return serving.batcher.queued_windows


def other_tasks() -> set[asyncio.Task[Any]]:
    """Tasks besides this test's and the batchers' consumers."""
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.get_name().startswith("batcher-")}


async def settled(engine: QAEngine, before: set[asyncio.Task[Any]]) -> None:
    """Waits until nothing of this test's requests is in flight, queued or running as a task."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PATIENCE
    while engine.in_flight or queued(engine) or other_tasks() - before:
        assert loop.time() < give_up, f"left behind: {other_tasks() - before}, {queued(engine)} windows"
        await asyncio.sleep(0.01)


async def test_the_guard_reports_a_task_destroyed_while_pending() -> None:
    loop = asyncio.get_running_loop()
    with PendingTaskGuard(loop) as guard:
        event = asyncio.Event()
        task = asyncio.create_task(event.wait())
        await asyncio.sleep(0)  # now it waits on the event's future, which only the event holds
        del task, event
        gc.collect()

    assert len(guard.destroyed) == 1
    assert "Event.wait" in guard.destroyed[0]


async def test_a_stream_runs_to_its_final_result_with_partials(engine: QAEngine, no_pending_tasks: object) -> None:
    updates = [update async for update in engine.answer_progressive(REQUEST)]

    *partials, final = updates
    assert isinstance(final, QAResult)
    assert partials and all(isinstance(p, QAProgress) for p in partials)
    assert [p.windows_done for p in partials if isinstance(p, QAProgress)] == sorted(
        {p.windows_done for p in partials if isinstance(p, QAProgress)}
    )
    assert final.answers == (await engine.answer(REQUEST)).answers


async def test_closing_a_stream_early_withdraws_its_windows(engine: QAEngine, no_pending_tasks: object) -> None:
    before = other_tasks()
    updates = engine.answer_progressive(REQUEST)

    first = await asyncio.wait_for(anext(updates), PATIENCE)
    assert isinstance(first, QAProgress) and first.windows_done < first.windows_total
    await updates.aclose()

    await settled(engine, before)


@pytest.mark.parametrize("after", [1, 2, 3])
async def test_cancelling_a_streams_consumer_leaves_nothing_behind(
    engine: QAEngine, no_pending_tasks: object, after: int
) -> None:
    before = other_tasks()
    got = 0
    enough = asyncio.Event()

    async def consume() -> None:
        nonlocal got
        async with contextlib.aclosing(engine.answer_progressive(REQUEST)) as updates:
            async for _ in updates:
                got += 1
                if got == after:
                    enough.set()  # the consumer goes on waiting for the next update; it is cancelled there

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(enough.wait(), PATIENCE)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer

    await settled(engine, before)


async def test_an_abandoned_stream_leaves_nothing_behind(engine: QAEngine, no_pending_tasks: object) -> None:
    before = other_tasks()
    updates = engine.answer_progressive(REQUEST)
    await asyncio.wait_for(anext(updates), PATIENCE)

    del updates  # never closed: the loop finalizes it
    gc.collect()

    await settled(engine, before)


async def test_a_cancelled_answer_leaves_nothing_behind(engine: QAEngine, no_pending_tasks: object) -> None:
    before = other_tasks()
    answering = asyncio.create_task(engine.answer(REQUEST))
    await asyncio.sleep(0.01)

    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering

    await settled(engine, before)
    assert (await engine.answer(REQUEST)).answers  # and the engine keeps serving


async def test_stopping_mid_stream_ends_it_and_leaves_nothing_behind(
    tiny_model_dir: Path, executor: ThreadPoolExecutor, no_pending_tasks: object
) -> None:
    metrics = Metrics(CollectorRegistry())
    models = ModelRegistry([ModelSpec("tiny", str(tiny_model_dir), device="cpu", max_batch_windows=1)], "tiny", metrics)
    engine = QAEngine(models, executor=executor, metrics=metrics)
    before = other_tasks()
    updates = engine.answer_progressive(REQUEST)
    await asyncio.wait_for(anext(updates), PATIENCE)

    await models.close()
    with pytest.raises(ShuttingDown):
        async with contextlib.aclosing(updates):
            async for _ in updates:
                pass

    assert engine.in_flight == 0
    assert not {t for t in other_tasks() - before if not t.done()}
