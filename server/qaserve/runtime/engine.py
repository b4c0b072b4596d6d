"""The request path: admission, tokenizing, batched forward passes and decoding, with timings and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

import numpy as np

from qaserve.errors import Overloaded
from qaserve.metrics import Metrics
from qaserve.qa import (
    Answer,
    ModelRef,
    QAParams,
    QAProgress,
    QARequest,
    QAResult,
    Timing,
    WindowCandidates,
    Windows,
    decode_answers,
    merge_candidates,
    score_windows,
)
from qaserve.runtime.model import Logits, QAModel, WindowLogits
from qaserve.runtime.registry import ModelRegistry, ServingModel

P = ParamSpec("P")
R = TypeVar("R")

# Called on the event loop as each window of a request is scored.
WindowCallback = Callable[[Windows, QAParams, int, WindowLogits], None]


class QAEngine:
    """Answers QARequests. At most `max_in_flight` requests are admitted at once; the rest get Overloaded."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        executor: Executor,
        metrics: Metrics,
        max_in_flight: int = 1024,
        max_context_chars: int = 100_000,
        retry_after: float = 0.05,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.max_context_chars = max_context_chars
        self._executor = executor
        self._retry_after = retry_after
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        if self._in_flight >= self.max_in_flight:
            self.metrics.rejections.labels("overloaded").inc()
            raise Overloaded(
                f"the server is at its limit of {self.max_in_flight} requests in flight; retry shortly",
                self._retry_after,
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def answer(
        self, request: QARequest, deadline: float | None = None, on_window: WindowCallback | None = None
    ) -> QAResult:
        """Answers one request. `deadline` is on the event loop's clock; `on_window` sees each scored window."""
        started = time.perf_counter()
        request.validate(self.max_context_chars)
        with self._admit():
            async with self.registry.use(request.model) as serving:
                return await self._answer(request, serving, deadline, on_window, started)

    async def _answer(
        self,
        request: QARequest,
        serving: ServingModel,
        deadline: float | None,
        on_window: WindowCallback | None,
        started: float,
    ) -> QAResult:
        model, batcher = serving.model, serving.batcher
        name = model.name
        params = model.resolve(request.params)

        with batcher.incoming():
            t0 = time.perf_counter()
            windows = await self._run(model.split, request.question, request.context, params)
            tokenize = time.perf_counter() - t0
        self.metrics.tokenize_duration.labels(name).observe(tokenize)

        callback = None if on_window is None else (lambda i, out: on_window(windows, params, i, out))
        outputs, batch_timing = await batcher.run(
            QAModel.inputs(windows), [len(ids) for ids in windows.input_ids], deadline, callback
        )
        self.metrics.queue_duration.labels(name).observe(batch_timing.queue)

        t0 = time.perf_counter()
        answers = await self._run(_decode, request.context, windows, outputs, params)
        decode = time.perf_counter() - t0
        self.metrics.decode_duration.labels(name).observe(decode)

        return QAResult(
            answers=tuple(answers),
            model=ModelRef(
                name=name,
                revision=model.revision,
                device=",".join(model.devices),
                dtype=model.dtype,
            ),
            timing=Timing(
                total=time.perf_counter() - started,
                tokenize=tokenize,
                queue=batch_timing.queue,
                forward=batch_timing.forward,
                decode=decode,
            ),
            windows=len(windows),
        )

    async def answer_progressive(
        self, request: QARequest, deadline: float | None = None
    ) -> AsyncGenerator[QAProgress | QAResult]:
        """Yields QAProgress after each group of scored windows of a multi-window context, then the QAResult
        that answer() returns. Closing the iterator early cancels the request's remaining windows."""
        scored: dict[int, WindowLogits] = {}
        seen: list[tuple[Windows, QAParams]] = []
        arrived = asyncio.Event()

        def on_window(windows: Windows, params: QAParams, index: int, logits: WindowLogits) -> None:
            if not seen:
                seen.append((windows, params))
            scored[index] = logits
            arrived.set()

        task = asyncio.create_task(self.answer(request, deadline, on_window))
        candidates: dict[int, WindowCandidates] = {}
        try:
            while not task.done():
                waiter = asyncio.create_task(arrived.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                arrived.clear()
                if task.done() or not seen:
                    break
                windows, params = seen[0]
                if len(scored) == len(windows):
                    continue  # the final result follows and covers every window
                new = sorted(set(scored) - set(candidates))
                fresh = await self._run(_score, windows, new, [scored[i] for i in new], params)
                candidates.update(zip(new, fresh, strict=True))
                answers = merge_candidates(request.context, [candidates[i] for i in sorted(candidates)], params)
                yield QAProgress(tuple(answers), len(candidates), len(windows))
            yield await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))


def _stack(outputs: list[WindowLogits]) -> tuple[Logits, Logits]:
    """Per-window logits as [windows, longest] float32 start and end arrays, right-padded with zeros."""
    shape = (len(outputs), max(len(o.start) for o in outputs))
    start = np.zeros(shape, dtype=np.float32)
    end = np.zeros(shape, dtype=np.float32)
    for row, o in enumerate(outputs):
        start[row, : len(o.start)] = o.start
        end[row, : len(o.end)] = o.end
    return start, end


def _decode(context: str, windows: Windows, outputs: list[WindowLogits], params: QAParams) -> list[Answer]:
    return decode_answers(context, windows, *_stack(outputs), params)


def _score(
    windows: Windows, indices: list[int], outputs: list[WindowLogits], params: QAParams
) -> list[WindowCandidates]:
    return score_windows(windows, indices, *_stack(outputs), params)
