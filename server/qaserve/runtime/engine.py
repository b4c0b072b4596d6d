"""The request path: admission, tokenizing, batched forward passes and decoding, with timings and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar, cast

import numpy as np
from prometheus_client import CollectorRegistry

from qaserve.errors import InvalidArgument, Overloaded
from qaserve.metrics import Metrics
from qaserve.qa import (
    Answer,
    ModelRef,
    PassageAnswer,
    QAParams,
    QAProgress,
    QARequest,
    QAResult,
    ReadRequest,
    ReadResult,
    RunningMerge,
    Timing,
    WindowCandidates,
    Windows,
    decode_answers,
    read_answers,
    score_windows,
)
from qaserve.runtime.backends.base import Logits, WindowInput, WindowLogits
from qaserve.runtime.batcher import BatchTiming, WindowResults
from qaserve.runtime.cache import CachedAnswers, CacheKey, ResponseCache, cache_key, read_cache_key
from qaserve.runtime.cache_entry import ModelState, ServingModel
from qaserve.runtime.model import ModelLoader, QAModel
from qaserve.runtime.registry import ModelRegistry
from qaserve.runtime.spec import ModelsConfig

R = TypeVar("R")

# Tokenizing a SQuAD paragraph (about one window) takes ~0.3 ms and decoding one window ~0.1 ms (the embedded model,
# medians alone), where the server reported 0.83 and 0.62 ms for them through the pool: the hop to a pool thread and
# back cost more than the work. So such short work runs on the event loop; longer contexts and several windows go to
# the pool, where they hold up no other request.
INLINE_CONTEXT_CHARS = 2000
# Scoring a finished window for a partial answer takes ~0.05 ms (four: ~0.14 ms), the hop to the pool and back 0.03 ms
# on an idle loop and more on busy cores; a progressive call on a long context scores after every forward pass.
INLINE_SCORE_WINDOWS = 4


class QAEngine:
    """Answers QARequests. At most `max_in_flight` requests are admitted at once, and at most a model's own
    `max_in_flight` (its spec's, where set) of that model; the rest get Overloaded while other models keep serving.

    Repeated requests are answered from `cache` (none: no response cache).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        executor: Executor,
        metrics: Metrics,
        cache: ResponseCache | None = None,
        max_in_flight: int = 1024,
        max_context_chars: int = 100_000,
        max_passages: int = 100,
        retry_after: float = 0.05,
        record_stages: Callable[[QAResult | ReadResult, tuple[int, ...]], None] | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.cache = cache if cache is not None else ResponseCache(0, metrics)
        self.max_in_flight = max_in_flight
        self.max_context_chars = max_context_chars
        self.max_passages = max_passages
        self._executor = executor
        self._retry_after = retry_after
        self._in_flight = 0
        self._model_in_flight: dict[str, int] = {}  # by configured name, while above 0
        self._record_stages = record_stages  # tracing's stage spans; None when tracing is off

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def _admit(self, model: str) -> Iterator[None]:
        if self._in_flight >= self.max_in_flight:
            raise Overloaded(
                f"the server is at its limit of {self.max_in_flight} requests in flight; retry shortly",
                self._retry_after,
            )
        spec = self.registry.spec(model)  # the current configuration's: a reload applies to the next request
        held = self._model_in_flight.get(spec.name, 0)
        if spec.max_in_flight is not None and held >= spec.max_in_flight:
            raise Overloaded(
                f"model {spec.name!r} is at its limit of {spec.max_in_flight} requests in flight; retry shortly",
                self._retry_after,
            )
        self._in_flight += 1
        self._model_in_flight[spec.name] = held + 1
        try:
            yield
        finally:
            self._in_flight -= 1
            left = self._model_in_flight[spec.name] - 1
            if left:
                self._model_in_flight[spec.name] = left
            else:
                del self._model_in_flight[spec.name]

    async def answer(self, request: QARequest, deadline: float | None = None) -> QAResult:
        """Answers one request. `deadline` is on the event loop's clock."""
        async with contextlib.aclosing(self._updates(request, deadline, progress=False)) as updates:
            result = await anext(updates)  # without progress, the result is the only update
        assert isinstance(result, QAResult)
        return result

    def answer_progressive(
        self, request: QARequest, deadline: float | None = None
    ) -> AsyncGenerator[QAProgress | QAResult]:
        """Yields QAProgress after each group of scored windows of a multi-window context, then the QAResult
        that answer() returns (alone when it comes from the response cache). Closing the iterator early
        withdraws the request's windows that have not run."""
        return self._updates(request, deadline, progress=True)

    async def _updates(
        self, request: QARequest, deadline: float | None, *, progress: bool
    ) -> AsyncGenerator[QAProgress | QAResult]:
        started = time.perf_counter()
        request.validate(self.max_context_chars)
        with self._admit(request.model):
            async with self.registry.use(request.model) as serving:
                model = serving.model
                params = model.resolve(request.params)
                key, hit = self._cached(
                    lambda: cache_key(model.name, _variant(model), params, request.question, request.context)
                )
                if hit is not None:
                    timing = Timing(total=time.perf_counter() - started, cached=True)
                    result = QAResult(hit.answers, _model_ref(model), timing, hit.windows)
                else:
                    stages = _Stages(self._executor, self.metrics, serving, started, deadline)
                    windows = await stages.tokenize(
                        lambda: model.split(request.question, request.context, params),
                        inline=len(request.context) <= INLINE_CONTEXT_CHARS,
                        context_chars=len(request.context),
                    )
                    logits: dict[int, WindowLogits] = {}
                    merged = RunningMerge(request.context, params)
                    async with stages.forward(QAModel.inputs(windows)) as results:
                        async for finished in results:
                            logits.update(finished)
                            if progress and len(logits) < len(windows):  # else the final result follows at once
                                yield await self._progress(windows, params, finished, merged)
                    ordered = [logits[i] for i in range(len(windows))]
                    answers = await stages.decode(
                        lambda: _decode(request.context, windows, ordered, params), inline=len(windows) == 1
                    )
                    result = QAResult(tuple(answers), _model_ref(model), stages.timing(), len(windows))
                    self._finish(key, result, stages)
        yield result

    async def read(self, request: ReadRequest, deadline: float | None = None) -> ReadResult:
        """Answers one question over several passages: every window of every passage goes through admission, the
        batcher and the deadline as one request (cancelling withdraws the windows not yet run)."""
        started = time.perf_counter()
        request.validate(self.max_context_chars, self.max_passages)
        with self._admit(request.model):
            async with self.registry.use(request.model) as serving:
                model = serving.model
                params = model.resolve(request.params)
                key, hit = self._cached(
                    lambda: read_cache_key(
                        model.name, _variant(model), params, request.read, request.question, request.passages
                    )
                )
                if hit is not None:
                    timing = Timing(total=time.perf_counter() - started, cached=True)
                    return ReadResult(
                        cast(tuple[PassageAnswer, ...], hit.answers),  # what read() stored under a read key
                        hit.no_answer_score,
                        request.read.score_mode,
                        _model_ref(model),
                        timing,
                        hit.windows,
                    )
                stages = _Stages(self._executor, self.metrics, serving, started, deadline)
                windows = await stages.tokenize(
                    lambda: _split_passages(model, request, params),
                    inline=False,
                    context_chars=sum(len(p.text) for p in request.passages),
                )
                inputs = [window for passage in windows for window in QAModel.inputs(passage)]
                logits: dict[int, WindowLogits] = {}
                async with stages.forward(inputs) as results:
                    async for finished in results:
                        logits.update(finished)
                ordered = iter([logits[i] for i in range(len(inputs))])
                outputs = [list(itertools.islice(ordered, len(passage))) for passage in windows]
                answers, no_answer = await stages.decode(lambda: _read(request, windows, outputs, params), inline=False)
                read = ReadResult(
                    answers, no_answer, request.read.score_mode, _model_ref(model), stages.timing(), len(inputs)
                )
                self._finish(key, read, stages)
                return read

    def _cached(self, key_of: Callable[[], CacheKey]) -> tuple[CacheKey | None, CachedAnswers | None]:
        """The request's cache key (None when there is no cache) and what the cache holds under it."""
        if not self.cache.enabled:
            return None, None
        key = key_of()
        return key, self.cache.get(key)

    def _finish(self, key: CacheKey | None, result: QAResult | ReadResult, stages: _Stages) -> None:
        """Stores a computed result under its cache key and traces its stages."""
        if key is not None:
            no_answer = result.no_answer_score if isinstance(result, ReadResult) else None
            self.cache.put(key, result.answers, result.windows, no_answer)
        if self._record_stages is not None:
            self._record_stages(result, stages.batch.batch_sizes)

    async def _progress(
        self, windows: Windows, params: QAParams, finished: list[tuple[int, WindowLogits]], merged: RunningMerge
    ) -> QAProgress:
        """Scores newly finished windows into `merged`; the best answers among every window scored so far."""
        indices = [index for index, _ in finished]
        outputs = [logits for _, logits in finished]
        score = functools.partial(_score, windows, indices, outputs, params)
        scored = await _here_or_pool(self._executor, score, here=len(finished) <= INLINE_SCORE_WINDOWS)
        for index, candidates in zip(indices, scored, strict=True):
            merged.add(index, candidates)
        return QAProgress(tuple(merged.answers()), merged.windows, len(windows))


async def _here_or_pool(executor: Executor, fn: Callable[[], R], *, here: bool) -> R:
    """fn() here on the event loop when `here` (work shorter than the hop), else on `executor`."""
    return fn() if here else await asyncio.get_running_loop().run_in_executor(executor, fn)


def _model_ref(model: QAModel) -> ModelRef:
    return ModelRef(
        name=model.name,
        revision=model.revision,
        device=",".join(model.devices),
        dtype=model.dtype,
    )


class _Stages:
    """One request's way through a model: tokenizing, forward passes, decoding; each stage timed and observed in
    the model's metrics."""

    def __init__(
        self,
        executor: Executor,
        metrics: Metrics,
        serving: ServingModel,
        started: float,
        deadline: float | None,
    ) -> None:
        self._executor = executor  # the engine's pool, for work too long for the event loop
        self._batcher = serving.batcher
        self._model = serving.model.name
        self._metrics = metrics
        self._started = started
        self._deadline = deadline
        self.tokenize_seconds = 0.0
        self.batch = BatchTiming(queue=0.0, forward=0.0)
        self.decode_seconds = 0.0

    async def tokenize(self, split: Callable[[], R], *, inline: bool, context_chars: int) -> R:
        """split() (here when `inline`, else on the pool), while the batcher knows windows are on their way."""
        with self._batcher.incoming():
            t0 = time.perf_counter()
            windows = await _here_or_pool(self._executor, split, here=inline)
            self.tokenize_seconds = time.perf_counter() - t0
        self._metrics.tokenize_duration.labels(self._model).observe(self.tokenize_seconds)
        self._metrics.request_context_chars.labels(self._model).observe(context_chars)
        return windows

    @contextlib.asynccontextmanager
    async def forward(self, inputs: list[WindowInput]) -> AsyncIterator[WindowResults[WindowInput, WindowLogits]]:
        """The batcher's run of `inputs`, to iterate over as forward passes finish them."""
        self._metrics.request_windows.labels(self._model).observe(len(inputs))
        async with self._batcher.run(inputs, [len(w.input_ids) for w in inputs], self._deadline) as results:
            yield results
        self.batch = results.timing
        self._metrics.queue_duration.labels(self._model).observe(self.batch.queue)

    async def decode(self, decode: Callable[[], R], *, inline: bool) -> R:
        """decode() (here when `inline`, else on the pool)."""
        t0 = time.perf_counter()
        result = await _here_or_pool(self._executor, decode, here=inline)
        self.decode_seconds = time.perf_counter() - t0
        self._metrics.decode_duration.labels(self._model).observe(self.decode_seconds)
        return result

    def timing(self) -> Timing:
        """The stage timings, the total up to now."""
        return Timing(
            total=time.perf_counter() - self._started,
            tokenize=self.tokenize_seconds,
            queue=self.batch.queue,
            forward=self.batch.forward,
            decode=self.decode_seconds,
        )


def build_engine(
    models: ModelsConfig,
    *,
    executor: Executor,
    metrics: Metrics | None = None,
    max_in_flight: int = 1024,
    max_context_chars: int = 100_000,
    max_passages: int = 100,
    on_state: Callable[[str, ModelState], None] | None = None,
    cache_bytes: int = 0,
    intra_op_threads: int = 0,
    tokenize_threads: int = 2,
    record_stages: Callable[[QAResult | ReadResult, tuple[int, ...]], None] | None = None,
) -> QAEngine:
    """The request engine over the configured models: their registry (model cache, batchers) and admission.

    Tokenizing and decoding run on `executor` (`tokenize_threads` wide: one tokenizer copy each); forward passes on
    each replica's own thread with `intra_op_threads` (0: by the backends' rule). `cache_bytes` bounds the response
    cache (0: none). `await engine.registry.close()` frees the models. The server, the benchmarks and the tests all
    build it here.
    """
    metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
    registry = ModelRegistry(
        models.models,
        default=models.default,
        metrics=metrics,
        max_models=models.max_models,
        max_bytes_per_device=models.max_bytes_per_device,
        on_state=on_state,
        loader=ModelLoader(intra_op_threads, tokenize_threads),
    )
    return QAEngine(
        registry,
        executor=executor,
        metrics=metrics,
        cache=ResponseCache(cache_bytes, metrics),
        max_in_flight=max_in_flight,
        max_context_chars=max_context_chars,
        max_passages=max_passages,
        record_stages=record_stages,
    )


def _variant(model: QAModel) -> str:
    """How the weights run: a reload onto another dtype or device (same weights revision) must not be answered
    from the old one's cache entries."""
    return f"{model.revision} {model.backend} {model.dtype} {','.join(model.devices)}"


def _split_passages(model: QAModel, request: ReadRequest, params: QAParams) -> list[Windows]:
    """Each passage's windows; a passage the tokenizer finds no text in is named by its index."""
    windows = []
    for index, passage in enumerate(request.passages):
        try:
            windows.append(model.split(request.question, passage.text, params))
        except InvalidArgument as error:
            if error.field != "context":
                raise
            raise InvalidArgument(f"passages[{index}].text", error.description) from None
    return windows


def _read(
    request: ReadRequest, windows: list[Windows], outputs: list[list[WindowLogits]], params: QAParams
) -> tuple[tuple[PassageAnswer, ...], float | None]:
    return read_answers(request, windows, [_stack(passage) for passage in outputs], params)


def _stack(outputs: list[WindowLogits]) -> tuple[Logits, Logits]:
    """Per-window logits as [windows, longest] float32 start and end arrays, right-padded with zeros."""
    if len(outputs) == 1:  # a view of the window's own arrays: nothing to pad
        return outputs[0].start[None], outputs[0].end[None]
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
