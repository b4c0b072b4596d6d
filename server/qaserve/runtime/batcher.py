"""Dynamic window batching: windows of concurrent requests share forward passes on a pool of replicas."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from types import TracebackType
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
    # The CPU policy (runtime/policy.py): a batch takes only windows of its oldest window's length, at most its
    # replica's share of the queue (queued windows / replicas), and a free replica does not wait for more.
    spread: bool = False


@dataclass(frozen=True)
class BatchTiming:
    """Where a request's time went inside the batcher, in seconds."""

    queue: float
    forward: float
    batch_sizes: tuple[int, ...] = ()  # windows in each forward pass the request's windows rode in


@dataclass(eq=False)
class QueuedRequest(Generic[Out]):
    """One request's windows in the batcher: those still queued (by key), and results not yet handed out."""

    deadline: float | None
    remaining: int  # windows whose results have not arrived
    submitted_at: float
    finished_at: float | None = None
    keys: set[int] = field(default_factory=set)
    arrived: deque[tuple[int, Out]] = field(default_factory=deque)
    error: BaseException | None = None
    closed: bool = False  # its consumer went away: nothing more to run or deliver
    # Seconds during which at least one forward pass held its windows (passes on several replicas at once count once)
    forward_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # windows in each forward pass it rode in
    passes_running: int = 0
    forward_since: float = 0.0
    waiter: asyncio.Future[None] | None = None  # set while its consumer waits for results

    def done(self) -> bool:
        """Nothing of it needs a forward pass any more."""
        return self.closed or self.error is not None or self.remaining == 0

    def deliver(self, index: int, output: Out) -> None:
        self.arrived.append((index, output))
        self.remaining -= 1
        if self.remaining == 0:
            self.finished_at = time.perf_counter()
        self._wake()

    def pass_started(self, at: float) -> None:
        if not self.passes_running:
            self.forward_since = at
        self.passes_running += 1

    def pass_ended(self, at: float) -> None:
        self.passes_running -= 1
        if not self.passes_running:
            self.forward_seconds += at - self.forward_since

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


@dataclass(eq=False)
class QueuedWindow:
    """One window waiting for a batch: its request, its queue key, its place in the request, its length, and the
    forward input."""

    request: QueuedRequest[Any]
    key: int
    index: int
    length: int
    window: Any


class WindowResults(Generic[In, Out]):
    """One request's window results as forward passes finish them: an async iterator of lists of
    (window index, output), one list per step (the windows of this request that one forward pass finished,
    or several if the consumer fell behind).

    The windows are queued on entering `async with` (or on the first step). Leaving the block, aclose(),
    cancellation or an error withdraws whatever is still queued, so it never costs a forward pass. `timing` is
    complete once every window has arrived.
    """

    def __init__(
        self, batcher: Batcher[In, Out], windows: Sequence[In], lengths: Sequence[int], deadline: float | None
    ) -> None:
        if len(windows) != len(lengths):
            raise ValueError(f"{len(windows)} windows but {len(lengths)} lengths")
        self._batcher = batcher
        self._windows = windows
        self._lengths = lengths
        self._deadline = deadline
        self._request: QueuedRequest[Out] | None = None

    @property
    def timing(self) -> BatchTiming:
        """Queue and forward seconds of this request so far (all of it once every window has arrived)."""
        request = self._request
        if request is None:
            return BatchTiming(queue=0.0, forward=0.0)
        end = request.finished_at if request.finished_at is not None else time.perf_counter()
        elapsed = end - request.submitted_at
        return BatchTiming(
            queue=max(0.0, elapsed - request.forward_seconds),
            forward=request.forward_seconds,
            batch_sizes=tuple(request.batch_sizes),
        )

    async def __aenter__(self) -> WindowResults[In, Out]:
        self._submit()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> WindowResults[In, Out]:
        return self

    async def __anext__(self) -> list[tuple[int, Out]]:
        request = self._submit()
        try:
            while True:
                if request.error is not None:
                    raise request.error
                if request.closed:
                    raise StopAsyncIteration
                if request.arrived:
                    finished = list(request.arrived)
                    request.arrived.clear()
                    return finished
                if request.remaining == 0:
                    raise StopAsyncIteration
                request.waiter = asyncio.get_running_loop().create_future()
                try:
                    await request.waiter
                finally:
                    request.waiter = None
        except BaseException as error:
            if not isinstance(error, StopAsyncIteration):
                self._close()
            raise

    async def aclose(self) -> None:
        """Withdraws the request's windows that are still queued; results still to come are dropped."""
        self._close()

    def _submit(self) -> QueuedRequest[Out]:
        if self._request is None:
            self._request = self._batcher._submit(self._windows, self._lengths, self._deadline)
        return self._request

    def _close(self) -> None:
        if self._request is not None and not self._request.closed:
            self._request.closed = True
            self._batcher._withdraw(self._request)


class Batcher(Generic[In, Out]):
    """Queues windows, forms batches under BatchLimits, and feeds one consumer task per replica.

    Windows of cancelled or expired requests leave the queue before they cost a forward pass; a failing forward
    fails exactly the requests whose windows were in that batch.

    `solo`, one of `replicas` (a CPU model's replica with every core, runtime/policy.py), runs a lone request: it
    alone starts when every queued window belongs to one request and no forward pass runs, takes that request's
    oldest window, and no other replica starts while it runs. One window a pass ran as fast as equal-length batches
    on every core, and between passes a request that arrives meanwhile sends both requests' windows to the lanes.
    """

    def __init__(
        self,
        model: str,
        replicas: Sequence[Replica[In, Out]],
        limits: BatchLimits,
        metrics: Metrics,
        solo: Replica[In, Out] | None = None,
    ) -> None:
        if solo is not None and solo not in replicas:
            raise ValueError("the solo replica must be one of the replicas")
        self.model = model
        self.limits = limits
        self._replicas = list(replicas)
        self._solo = solo
        self._lanes = max(1, len(self._replicas) - (solo is not None))
        self._running = 0  # forward passes in flight
        self._solo_running = False
        self._metrics = metrics
        self._pending: dict[int, QueuedWindow] = {}
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
        for queued in list(self._pending.values()):
            self._fail(queued.request, ShuttingDown("the server is shutting down"))
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

    def run(
        self, windows: Sequence[In], lengths: Sequence[int], deadline: float | None = None
    ) -> WindowResults[In, Out]:
        """One request's windows, to iterate over as they finish:

            async with batcher.run(windows, lengths, deadline) as results:
                async for finished in results:
                    for index, output in finished: ...
            timing = results.timing

        `deadline` is on the event loop's clock. A stopped batcher raises ShuttingDown on the first step.
        """
        return WindowResults(self, windows, lengths, deadline)

    def _submit(self, windows: Sequence[In], lengths: Sequence[int], deadline: float | None) -> QueuedRequest[Out]:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        request: QueuedRequest[Out] = QueuedRequest(
            deadline=deadline, remaining=len(windows), submitted_at=time.perf_counter()
        )
        if not windows:
            request.finished_at = request.submitted_at
            return request
        for index, (window, length) in enumerate(zip(windows, lengths, strict=True)):
            key = next(self._keys)
            self._pending[key] = QueuedWindow(request, key, index, length, window)
            request.keys.add(key)
        self._update_depth()
        self._wake()
        return request

    # -- consumers ----------------------------------------------------------------------------------------------

    async def _consume(self, replica: Replica[In, Out]) -> None:
        loop = asyncio.get_running_loop()
        solo = replica is self._solo
        while not self._closed:
            await self._wait_for_turn(replica)
            if self._closed:
                return
            if solo or not self.limits.spread:
                await self._wait_for_incoming(loop)
                if not self._may_run(replica):
                    continue
            batch = self._take_batch(loop.time(), solo=solo)
            if not batch:
                continue
            requests = {queued.request for queued in batch}
            started = time.perf_counter()
            for request in requests:
                request.pass_started(started)
            self._running += 1
            self._solo_running = solo
            try:
                outputs = await loop.run_in_executor(replica.executor, replica.forward, [q.window for q in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"forward returned {len(outputs)} outputs for {len(batch)} windows")
            except asyncio.CancelledError:
                for request in requests:
                    self._fail(request, ShuttingDown("the server stopped before this request was answered"))
                raise
            except Exception:
                log.exception("forward pass failed on %s (%d windows)", replica.label, len(batch))
                for request in requests:
                    self._fail(request, InferenceFailed("the model failed to process this request"))
                continue
            finally:
                ended = time.perf_counter()
                for request in requests:
                    request.pass_ended(ended)
                self._running -= 1
                self._solo_running = False
                if self._solo is not None:
                    self._wake()  # the cores this pass held are free: the solo replica or the lanes may start
            seconds = ended - started
            self._forward_estimate = (
                seconds if not self._forward_estimate else 0.8 * self._forward_estimate + 0.2 * seconds
            )
            self._observe(replica, batch, seconds)
            for request in requests:
                request.batch_sizes.append(len(batch))
            for queued, output in zip(batch, outputs, strict=True):
                if not queued.request.done():
                    queued.request.deliver(queued.index, output)

    async def _wait_for_turn(self, replica: Replica[In, Out]) -> None:
        """Until windows are queued that this replica may take (see _may_run)."""
        assert self._wakeup is not None
        while not (self._pending and self._may_run(replica)) and not self._closed:
            self._wakeup.clear()
            await self._wakeup.wait()

    def _may_run(self, replica: Replica[In, Out]) -> bool:
        """With a solo replica: it takes a lone request's windows while nothing runs; the others take everything
        else, and never start beside it."""
        if self._solo is None:
            return True
        if self._solo_running:
            return False
        return self._lone_request() if replica is self._solo else not self._lone_request()

    def _lone_request(self) -> bool:
        """Nothing runs and every queued window belongs to one request (its keys are all the queued ones)."""
        if self._running or not self._pending:
            return False
        return len(next(iter(self._pending.values())).request.keys) == len(self._pending)

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

    def _take_batch(self, now: float, solo: bool = False) -> list[QueuedWindow]:
        """Oldest live window first, then the queued windows closest to its length, within the limits; the solo
        replica's batch is that oldest window alone."""
        limits = self.limits
        candidates: list[QueuedWindow] = []
        for queued in list(self._pending.values()):
            request = queued.request
            if request.done():
                self._withdraw(request)
            elif request.deadline is not None and request.deadline < now + self._forward_estimate:
                self._fail(request, DeadlineTooShort("the deadline passes before this request's windows can run"))
                self._metrics.rejections.labels("deadline").inc()
            elif queued.key in self._pending:
                candidates.append(queued)
                if len(candidates) >= limits.max_windows * LOOKAHEAD_BATCHES:
                    break
        if not candidates:
            self._update_depth()
            return []
        anchor = candidates[0].length
        most = limits.max_windows
        if solo:
            most = 1
        elif limits.spread:
            most = min(most, -(-len(candidates) // self._lanes))
        if limits.spread:
            candidates = [queued for queued in candidates if queued.length == anchor]
        candidates.sort(key=lambda queued: abs(queued.length - anchor))  # stable: FIFO among equal distances
        batch: list[QueuedWindow] = []
        longest = 0
        for queued in candidates:
            width = max(longest, queued.length)
            if batch and limits.max_tokens and width * (len(batch) + 1) > limits.max_tokens:
                continue
            batch.append(queued)
            longest = width
            if len(batch) >= most:
                break
        for queued in batch:
            del self._pending[queued.key]
            queued.request.keys.discard(queued.key)
        self._update_depth()
        return batch

    def _fail(self, request: QueuedRequest[Any], error: BaseException) -> None:
        if not request.done():
            request.fail(error)
        self._withdraw(request)

    def _withdraw(self, request: QueuedRequest[Any]) -> None:
        """Removes a request's queued windows (closed, failed, expired or done)."""
        for key in request.keys:
            self._pending.pop(key, None)
        request.keys.clear()
        self._update_depth()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _update_depth(self) -> None:
        self._metrics.queue_depth.labels(self.model).set(len(self._pending))

    def _observe(self, replica: Replica[In, Out], batch: list[QueuedWindow], seconds: float) -> None:
        lengths = [queued.length for queued in batch]
        padded = max(lengths) * len(lengths)
        m = self._metrics
        m.forward_duration.labels(self.model, str(replica.device)).observe(seconds)
        m.batch_windows.labels(self.model).observe(len(batch))
        m.batch_tokens.labels(self.model).observe(padded)
        m.padding_ratio.labels(self.model).observe(1.0 - sum(lengths) / padded)
