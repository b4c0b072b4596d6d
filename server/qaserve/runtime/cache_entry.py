"""A configured model's place in the model cache: its state, the version serving it, and the room it holds."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from qaserve.errors import redact_host_details
from qaserve.metrics import Metrics
from qaserve.runtime.backends import WindowInput, WindowLogits
from qaserve.runtime.batcher import Batcher, BatchLimits
from qaserve.runtime.budget import Holding
from qaserve.runtime.device import default_batch_tokens
from qaserve.runtime.model import QAModel
from qaserve.runtime.policy import spreads_windows
from qaserve.runtime.spec import ModelSpec

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServingModel:
    """A loaded model with the batcher that feeds its replicas, and the requests using it now."""

    model: QAModel
    batcher: Batcher[WindowInput, WindowLogits]
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @classmethod
    def start(cls, model: QAModel, metrics: Metrics) -> ServingModel:
        """`model` serving: its batcher started, with its spec's batching limits on its first device."""
        limits = batch_limits(model.spec, model.devices[0])
        batcher: Batcher[WindowInput, WindowLogits] = Batcher(
            model.name, model.replicas, limits, metrics, solo=model.solo
        )
        batcher.start()
        return cls(model, batcher)

    @contextlib.contextmanager
    def hold(self) -> Iterator[ServingModel]:
        """Counts a request using the model while the block runs."""
        self.active += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    def holding(self, evictable: bool = False) -> Holding:
        """The room it takes in the cache."""
        return Holding(self.model.name, tuple(self.model.devices), self.model.nbytes, evictable)

    async def close(self) -> None:
        """Stops the batcher and frees the model (its replicas close on their threads)."""
        await self.batcher.stop()
        await asyncio.to_thread(self.model.close)


class Retiring:
    """Models no entry serves any more (old versions of reloaded models, removed models), each closing once its
    requests in flight finish, at most `drain_seconds` later or when `closing` is set. They hold their room in
    the cache until closed; `on_closed` runs after each."""

    def __init__(self, drain_seconds: float, closing: asyncio.Event, on_closed: Callable[[], None]) -> None:
        self._drain_seconds = drain_seconds
        self._closing = closing
        self._on_closed = on_closed
        self._tasks: dict[asyncio.Task[None], ServingModel] = {}

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def holdings(self) -> list[Holding]:
        return [serving.holding() for serving in self._tasks.values()]

    def retire(self, serving: ServingModel, reason: str) -> asyncio.Task[None]:
        """Closes `serving` once idle; the task finishes when it has closed."""
        task = asyncio.create_task(self._drain_and_close(serving, reason), name=f"retire-{serving.model.name}")
        self._tasks[task] = serving
        task.add_done_callback(self._closed)
        return task

    async def wait_any(self) -> None:
        """Until one of them has closed."""
        await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def wait_all(self) -> None:
        """Until all of them, and those retired meanwhile, have closed."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("closing an old model version failed: %s", error)
        self._on_closed()

    async def _drain_and_close(self, serving: ServingModel, reason: str) -> None:
        log.info("unloading model %s (%s) once its %d request(s) in flight finish", serving.model.name, reason,
                 serving.active)  # fmt: skip
        idle = asyncio.ensure_future(serving.idle.wait())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((idle, closing), timeout=self._drain_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            closing.cancel()
        await serving.close()


@dataclass(frozen=True)
class ModelInfo:
    """A configured model as ModelService reports it."""

    name: str
    state: ModelState
    is_default: bool
    pinned: bool
    devices: tuple[str, ...]
    dtype: str
    bytes: int
    revision: str
    last_used: float | None  # wall-clock seconds
    error: str


@dataclass
class CacheEntry:
    """A configured model in the cache, loaded or not."""

    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    serving: ServingModel | None = None
    loading: asyncio.Task[ServingModel] | None = None
    error: str = ""
    last_used: float | None = None
    reserved: int = 0  # bytes held for a load in progress
    reserved_on: tuple[str, ...] = ()  # the devices they are held on

    def holding(self) -> Holding | None:
        """The room it takes in the cache: its model's, or its load's estimate; None when it takes none."""
        if self.serving is not None:
            return self.serving.holding(evictable=not self.spec.pinned)
        if self.loading is not None:
            return Holding(self.spec.name, self.reserved_on, self.reserved)
        return None

    def info(self, is_default: bool) -> ModelInfo:
        model = self.serving.model if self.serving else None
        return ModelInfo(
            name=self.spec.name,
            state=self.state,
            is_default=is_default,
            pinned=self.spec.pinned,
            devices=tuple(model.devices) if model else (self.spec.device,),
            dtype=model.dtype if model else "",
            bytes=model.nbytes if model else 0,
            revision=model.revision if model else "",
            last_used=self.last_used,
            error=self.error,
        )


def batch_limits(spec: ModelSpec, device: str) -> BatchLimits:
    """A model's batching limits on `device`: max_batch_tokens 0 takes the device's default; how batches form
    there is the batching policy's (runtime/policy.py)."""
    return BatchLimits(
        max_windows=spec.max_batch_windows,
        max_tokens=spec.max_batch_tokens or default_batch_tokens(device),
        max_wait=spec.max_wait_ms / 1000.0,
        spread=spreads_windows(device),
    )


def describe_failure(exc: BaseException, spec: ModelSpec) -> str:
    """A load failure in one line for operators and clients, without the server's filesystem paths."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = redact_host_details(text, (spec.source,))
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
