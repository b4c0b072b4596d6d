"""The request path: admission, tokenizing, batched forward passes and decoding, with timings and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar, cast

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
    Timing,
    WindowCandidates,
    Windows,
    decode_answers,
    merge_candidates,
    read_answers,
    score_windows,
)
from qaserve.runtime.backends.base import Logits, WindowLogits
from qaserve.runtime.batcher import BatchTiming
from qaserve.runtime.cache import ResponseCache, cache_key, read_cache_key
from qaserve.runtime.cache_entry import ModelState
from qaserve.runtime.model import QAModel, model_loader
from qaserve.runtime.registry import ModelRegistry
from qaserve.runtime.spec import ModelsConfig

P = ParamSpec("P")
R = TypeVar("R")

# Tokenizing a SQuAD paragraph (about one window) takes ~0.3 ms and decoding one window ~0.1 ms (the embedded model,
# medians alone), where the server reported 0.83 and 0.62 ms for them through the pool: the hop to a pool thread and
# back cost more than the work. So such short work runs on the event loop; longer contexts and several windows go to
# the pool, where they hold up no other request.
INLINE_CONTEXT_CHARS = 2000


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
                model, batcher = serving.model, serving.batcher
                params = model.resolve(request.params)
                key = (
                    cache_key(model.name, _variant(model), params, request.question, request.context)
                    if self.cache.enabled
                    else None
                )
                hit = self.cache.get(key) if key is not None else None
                if hit is not None:
                    timing = Timing(total=time.perf_counter() - started, cached=True)
                    result = QAResult(hit.answers, _model_ref(model), timing, hit.windows)
                else:
                    with batcher.incoming():
                        t0 = time.perf_counter()
                        windows = await self._inline_if(
                            len(request.context) <= INLINE_CONTEXT_CHARS,
                            model.split,
                            request.question,
                            request.context,
                            params,
                        )
                        tokenize = time.perf_counter() - t0
                    self.metrics.tokenize_duration.labels(model.name).observe(tokenize)
                    self.metrics.request_context_chars.labels(model.name).observe(len(request.context))
                    self.metrics.request_windows.labels(model.name).observe(len(windows))

                    logits: dict[int, WindowLogits] = {}
                    candidates: dict[int, WindowCandidates] = {}
                    lengths = [len(ids) for ids in windows.input_ids]
                    async with batcher.run(QAModel.inputs(windows), lengths, deadline) as results:
                        async for finished in results:
                            logits.update(finished)
                            if progress and len(logits) < len(windows):  # else the final result follows at once
                                yield await self._progress(request.context, windows, params, finished, candidates)
                    batch_timing = results.timing
                    self.metrics.queue_duration.labels(model.name).observe(batch_timing.queue)

                    t0 = time.perf_counter()
                    ordered = [logits[i] for i in range(len(windows))]
                    answers = await self._inline_if(
                        len(windows) == 1, _decode, request.context, windows, ordered, params
                    )
                    decode = time.perf_counter() - t0
                    self.metrics.decode_duration.labels(model.name).observe(decode)

                    timing = _timing(started, tokenize, batch_timing, decode)
                    result = QAResult(tuple(answers), _model_ref(model), timing, len(windows))
                    if key is not None:
                        self.cache.put(key, result.answers, result.windows)
                    if self._record_stages is not None:
                        self._record_stages(result, batch_timing.batch_sizes)
        yield result

    async def read(self, request: ReadRequest, deadline: float | None = None) -> ReadResult:
        """Answers one question over several passages: every window of every passage goes through admission, the
        batcher and the deadline as one request (cancelling withdraws the windows not yet run)."""
        started = time.perf_counter()
        request.validate(self.max_context_chars, self.max_passages)
        with self._admit(request.model):
            async with self.registry.use(request.model) as serving:
                model, batcher = serving.model, serving.batcher
                params = model.resolve(request.params)
                key = (
                    read_cache_key(
                        model.name, _variant(model), params, request.read, request.question, request.passages
                    )
                    if self.cache.enabled
                    else None
                )
                hit = self.cache.get(key) if key is not None else None
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
                with batcher.incoming():
                    t0 = time.perf_counter()
                    windows = await self._run(_split_passages, model, request, params)
                    tokenize = time.perf_counter() - t0
                self.metrics.tokenize_duration.labels(model.name).observe(tokenize)
                self.metrics.request_context_chars.labels(model.name).observe(
                    sum(len(p.text) for p in request.passages)
                )
                inputs = [window for passage in windows for window in QAModel.inputs(passage)]
                self.metrics.request_windows.labels(model.name).observe(len(inputs))

                logits: dict[int, WindowLogits] = {}
                async with batcher.run(inputs, [len(w.input_ids) for w in inputs], deadline) as results:
                    async for finished in results:
                        logits.update(finished)
                batch_timing = results.timing
                self.metrics.queue_duration.labels(model.name).observe(batch_timing.queue)

                t0 = time.perf_counter()
                ordered = iter([logits[i] for i in range(len(inputs))])
                outputs = [list(itertools.islice(ordered, len(passage))) for passage in windows]
                answers, no_answer = await self._run(_read, request, windows, outputs, params)
                decode = time.perf_counter() - t0
                self.metrics.decode_duration.labels(model.name).observe(decode)
                if key is not None:
                    self.cache.put(key, answers, len(inputs), no_answer)
                timing = _timing(started, tokenize, batch_timing, decode)
                read = ReadResult(answers, no_answer, request.read.score_mode, _model_ref(model), timing, len(inputs))
                if self._record_stages is not None:
                    self._record_stages(read, batch_timing.batch_sizes)
                return read

    async def _progress(
        self,
        context: str,
        windows: Windows,
        params: QAParams,
        finished: list[tuple[int, WindowLogits]],
        candidates: dict[int, WindowCandidates],
    ) -> QAProgress:
        """Scores newly finished windows into `candidates`; the best answers among every window scored so far."""
        indices = [index for index, _ in finished]
        scored = await self._run(_score, windows, indices, [logits for _, logits in finished], params)
        candidates.update(zip(indices, scored, strict=True))
        answers = merge_candidates(context, [candidates[i] for i in sorted(candidates)], params)
        return QAProgress(tuple(answers), len(candidates), len(windows))

    async def _inline_if(self, short: bool, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """fn(...) here on the event loop when `short` (see INLINE_CONTEXT_CHARS), else on the pool."""
        return fn(*args, **kwargs) if short else await self._run(fn, *args, **kwargs)

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))


def _model_ref(model: QAModel) -> ModelRef:
    return ModelRef(
        name=model.name,
        revision=model.revision,
        device=",".join(model.devices),
        dtype=model.dtype,
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
        loader=model_loader(intra_op_threads, tokenize_threads),
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


def _timing(started: float, tokenize: float, batch: BatchTiming, decode: float) -> Timing:
    """A request's stage timings, its total up to now."""
    return Timing(
        total=time.perf_counter() - started,
        tokenize=tokenize,
        queue=batch.queue,
        forward=batch.forward,
        decode=decode,
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
