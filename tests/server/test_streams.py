"""The bounded fan-out helper (api/streams.py) with controllable handlers: bound, order, failures, closing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from qaserve.api.streams import fan_out


async def numbers(count: int, read: list[int]) -> AsyncIterator[int]:
    for i in range(count):
        read.append(i)
        yield i


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_results_come_as_each_finishes_not_in_request_order() -> None:
    gates = {i: asyncio.Event() for i in range(3)}

    async def handle(i: int) -> int:
        await gates[i].wait()
        return i * 10

    read: list[int] = []
    results = fan_out(numbers(3, read), handle, max_in_flight=3)
    async with contextlib.aclosing(results):
        gates[2].set()
        assert await anext(results) == 20
        gates[0].set()
        assert await anext(results) == 0
        gates[1].set()
        assert await anext(results) == 10
        with pytest.raises(StopAsyncIteration):
            await anext(results)


async def test_no_more_requests_are_read_while_the_bound_is_taken() -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def handle(i: int) -> int:
        started.append(i)
        await release.wait()
        return i

    read: list[int] = []
    results = fan_out(numbers(10, read), handle, max_in_flight=3)
    async with contextlib.aclosing(results):
        first = asyncio.ensure_future(anext(results))
        await settle()
        assert started == [0, 1, 2]
        assert len(read) <= 4  # the fourth request may be read, but it waits for a slot
        release.set()
        taken = [await first]
        await settle()
        # finished but not taken results hold their slots: reading goes on only as results are taken
        assert len(started) <= 3 + len(taken)
        taken += [r async for r in results]
    assert sorted(taken) == list(range(10))


async def test_a_reading_failure_cancels_the_requests_in_progress_and_reaches_the_consumer() -> None:
    cancelled: list[int] = []

    async def broken() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0)
        raise ValueError("malformed stream")

    async def handle(i: int) -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    with pytest.raises(ValueError, match="malformed stream"):
        async for _ in fan_out(broken(), handle, max_in_flight=4):
            pass
    await settle()
    assert cancelled == [1]


async def test_a_handler_failure_reaches_the_consumer_after_the_results_before_it() -> None:
    async def handle(i: int) -> int:
        if i == 1:
            await asyncio.sleep(0)
            raise RuntimeError("handler bug")
        return i

    got: list[int] = []
    with pytest.raises(RuntimeError, match="handler bug"):
        async for result in fan_out(numbers(2, []), handle, max_in_flight=4):
            got.append(result)
    assert got == [0]


async def test_closing_early_cancels_everything_still_running() -> None:
    cancelled: list[int] = []

    async def handle(i: int) -> int:
        if i == 0:
            return 0
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    results = fan_out(numbers(3, []), handle, max_in_flight=3)
    assert await anext(results) == 0
    await settle()
    await results.aclose()
    await settle()
    assert sorted(cancelled) == [1, 2]
