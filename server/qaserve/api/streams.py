"""Bounded fan-out for streaming RPCs: handle a stream's requests concurrently, results as each is ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class _Done:
    """Marks the end of reading (or a failure, with the exception)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def fan_out(
    requests: AsyncIterable[In], handle: Callable[[In], Awaitable[Out]], max_in_flight: int
) -> AsyncGenerator[Out]:
    """Runs `handle` on each request as it arrives and yields the results in the order they finish.

    At most `max_in_flight` requests are in progress or finished but not yet taken by the consumer: past that,
    no further request is read until the consumer takes a result, so a peer that stops reading cannot make the
    server buffer without limit (TEI's stream helper bounds its fan-out the same way).

    `handle` should turn a request's failure into a result; an exception it lets out, or one from reading
    `requests` (a malformed or broken stream), cancels the requests in progress and is raised to the consumer
    once the results already finished are taken. Closing the iterator cancels everything still running.
    """
    slots = asyncio.Semaphore(max_in_flight)
    results: asyncio.Queue[Out | _Done] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()

    async def run(request: In) -> None:
        try:
            results.put_nowait(await handle(request))
        except Exception as error:
            results.put_nowait(_Done(error))

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(run(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
        except Exception as error:
            results.put_nowait(_Done(error))
        else:
            results.put_nowait(_Done())

    reader = asyncio.create_task(read())
    try:
        while not isinstance(result := await results.get(), _Done):
            yield result
            slots.release()
        if result.error is not None:
            raise result.error
    finally:
        for task in (reader, *running):
            task.cancel()
