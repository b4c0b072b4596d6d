"""Dynamic window batching: windows of concurrent requests share forward passes on a pool of replicas."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from qaserve.errors import DeadlineTooShort, InferenceFailed, ShuttingDown
from qaserve.metrics import Metrics

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

# How far back in the queue a batch may reach for windows of similar length: keeps the oldest window first
# (no starvation) and bounds the cost of choosing.
LOOKAHEAD_BATCHES = 8


class Replica(Protocol[In, Out]):
    """Something that runs one batch at a time on its own executor."""

    @property
    def executor(self) -> Executor: ...
    @property
    def label(self) -> str: ...
    @property
    def device(self) -> object: ...

    def forward(self, windows: list[In]) -> list[Out]: ...


@dataclass(frozen=True)
class BatchLimits:
    """A batch holds at most max_windows windows and max_tokens padded tokens (windows x longest).

    max_tokens 0 means no token limit here; the registry turns it into the device's default.
    """

    max_windows: int = 32
    max_tokens: int = 0
    # Longest a free replica waits for windows of requests still being tokenized; it never waits when nothing
    # is on its way, so a lone request on an idle server goes straight through.
    max_wait: float = 0.002


@dataclass(eq=False)
class Work(Generic[Out]):
    """One request's windows in flight: results fill in as batches finish."""

    lengths: list[int]
    deadline: float | None
    future: asyncio.Future[list[Out]]
    on_window: Callable[[int, Out], None] | None
    submitted_at: float
    results: list[Out | None] = field(default_factory=list)
    remaining: int = 0
    keys: set[int] = field(default_factory=set)
    forward_seconds: float = 0.0

    def done(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class Job:
    """One queued window: its request, its place in the request, its length, and the forward input."""

    work: Work[Any]
    index: int
    length: int
    window: Any


@dataclass(frozen=True)
class BatchTiming:
    """Where a request's time went inside the batcher, in seconds."""

    queue: float
    forward: float


class Batcher(Generic[In, Out]):
    """Queues windows, forms batches under BatchLimits, and feeds one consumer task per replica.

    Windows of cancelled or expired requests leave the queue before they cost a forward pass; a failing forward
    fails exactly the requests whose windows were in that batch.
    """

    def __init__(
        self,
        model: str,
        replicas: Sequence[Replica[In, Out]],
        limits: BatchLimits,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.limits = limits
        self._replicas = list(replicas)
        self._metrics = metrics
        self._pending: dict[int, Job] = {}
        self._keys = itertools.count()
        self._incoming = 0
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._forward_estimate = 0.0  # moving average of forward seconds, to drop requests that cannot make it
        self._closed = False

    @property
    def queued_windows(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Starts one consumer per replica; call from the running loop."""
        self._wakeup = asyncio.Event()
        self._tasks = [asyncio.create_task(self._consume(r), name=f"batcher-{r.label}") for r in self._replicas]

    async def stop(self, grace: float = 30.0) -> None:
        """Fails what is still queued; consumers finish the batch they are running (up to `grace` seconds,
        then those requests fail with ShuttingDown too) and exit."""
        self._closed = True
        for job in list(self._pending.values()):
            self._fail(job.work, ShuttingDown("the server is shutting down"))
        self._wake()
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=grace)
            for task in running:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Marks a request that will submit soon (being tokenized), so a free replica may wait for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wake()

    async def run(
        self,
        windows: Sequence[In],
        lengths: Sequence[int],
        deadline: float | None = None,
        on_window: Callable[[int, Out], None] | None = None,
    ) -> tuple[list[Out], BatchTiming]:
        """Queues one request's windows and waits for all their results (in window order).

        `deadline` is on the event loop's clock. On cancellation the request's windows leave the queue.
        """
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if not windows:
            return [], BatchTiming(queue=0.0, forward=0.0)
        loop = asyncio.get_running_loop()
        work: Work[Out] = Work(
            lengths=list(lengths),
            deadline=deadline,
            future=loop.create_future(),
            on_window=on_window,
            submitted_at=time.perf_counter(),
            results=[None] * len(windows),
            remaining=len(windows),
        )
        for index, (window, length) in enumerate(zip(windows, lengths, strict=True)):
            key = next(self._keys)
            self._pending[key] = Job(work, index, length, window)
            work.keys.add(key)
        self._update_depth()
        self._wake()
        try:
            results = await work.future
        finally:
            self._withdraw(work)
        elapsed = time.perf_counter() - work.submitted_at
        return results, BatchTiming(queue=max(0.0, elapsed - work.forward_seconds), forward=work.forward_seconds)

    # -- consumers ----------------------------------------------------------------------------------------------

    async def _consume(self, replica: Replica[In, Out]) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._wait_for_work()
            if self._closed:
                return
            await self._wait_for_incoming(loop)
            batch = self._take_batch(loop.time())
            if not batch:
                continue
            inputs = [job.window for _, job in batch]
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(replica.executor, replica.forward, inputs)
                if len(outputs) != len(batch):
                    raise RuntimeError(f"forward returned {len(outputs)} outputs for {len(batch)} windows")
            except asyncio.CancelledError:
                for work in {job.work for _, job in batch}:
                    self._fail(work, ShuttingDown("the server stopped before this request was answered"))
                raise
            except Exception:
                log.exception("forward pass failed on %s (%d windows)", replica.label, len(batch))
                for work in {job.work for _, job in batch}:
                    self._fail(work, InferenceFailed("the model failed to process this request"))
                continue
            seconds = time.perf_counter() - started
            self._forward_estimate = (
                seconds if not self._forward_estimate else 0.8 * self._forward_estimate + 0.2 * seconds
            )
            self._observe(replica, batch, seconds)
            for work in {job.work for _, job in batch}:
                work.forward_seconds += seconds
            for (_, job), output in zip(batch, outputs, strict=True):
                self._deliver(job, output)

    async def _wait_for_work(self) -> None:
        assert self._wakeup is not None
        while not self._pending and not self._closed:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _wait_for_incoming(self, loop: asyncio.AbstractEventLoop) -> None:
        """Gives requests being tokenized up to max_wait to join a batch that is not full yet."""
        assert self._wakeup is not None
        until = loop.time() + self.limits.max_wait
        while self._incoming and len(self._pending) < self.limits.max_windows and not self._closed:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take_batch(self, now: float) -> list[tuple[int, Job]]:
        """Oldest live window first, then the queued windows closest to its length, within the limits."""
        limits = self.limits
        candidates: list[tuple[int, Job]] = []
        for key, job in list(self._pending.items()):
            work = job.work
            if work.done():
                self._withdraw(work)
            elif work.deadline is not None and work.deadline < now + self._forward_estimate:
                self._fail(work, DeadlineTooShort("the deadline passes before this request's windows can run"))
                if self._metrics:
                    self._metrics.rejections.labels("deadline").inc()
            elif key in self._pending:
                candidates.append((key, job))
                if len(candidates) >= limits.max_windows * LOOKAHEAD_BATCHES:
                    break
        if not candidates:
            self._update_depth()
            return []
        anchor = candidates[0][1].length
        candidates.sort(key=lambda item: abs(item[1].length - anchor))  # stable: FIFO among equal distances
        batch: list[tuple[int, Job]] = []
        longest = 0
        for key, job in candidates:
            width = max(longest, job.length)
            if batch and limits.max_tokens and width * (len(batch) + 1) > limits.max_tokens:
                continue
            batch.append((key, job))
            longest = width
            if len(batch) >= limits.max_windows:
                break
        for key, job in batch:
            del self._pending[key]
            job.work.keys.discard(key)
        self._update_depth()
        return batch

    def _deliver(self, job: Job, output: Any) -> None:
        work = job.work
        if work.done():
            return
        work.results[job.index] = output
        work.remaining -= 1
        if work.on_window is not None:
            try:
                work.on_window(job.index, output)
            except Exception:
                log.exception("window callback failed")
        if work.remaining == 0:
            work.future.set_result(list(work.results))

    def _fail(self, work: Work[Any], error: BaseException) -> None:
        if not work.done():
            work.future.set_exception(error)
        self._withdraw(work)

    def _withdraw(self, work: Work[Any]) -> None:
        """Removes a request's queued windows (cancelled, failed, expired or done)."""
        for key in work.keys:
            self._pending.pop(key, None)
        work.keys.clear()
        self._update_depth()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _update_depth(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.labels(self.model).set(len(self._pending))

    def _observe(self, replica: Replica[In, Out], batch: list[tuple[int, Job]], seconds: float) -> None:
        if not self._metrics:
            return
        lengths = [job.length for _, job in batch]
        padded = max(lengths) * len(lengths)
        m = self._metrics
        m.forward_duration.labels(self.model, str(replica.device)).observe(seconds)
        m.batch_windows.labels(self.model).observe(len(batch))
        m.batch_tokens.labels(self.model).observe(padded)
        m.padding_ratio.labels(self.model).observe(1.0 - sum(lengths) / padded)
