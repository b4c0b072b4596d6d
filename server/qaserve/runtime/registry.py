"""The model cache: configured models by name, loaded on demand (once, off the event loop), kept in an LRU
bounded by count and by bytes per device, pinned ones never evicted; reconfigured in place on reload."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from qaserve.errors import ModelFailed, ModelNotFound, ModelNotReady, ModelPinned, ModelTooLarge, redact_host_details
from qaserve.metrics import Metrics
from qaserve.runtime.backends import estimate_bytes, load_model, plan_devices
from qaserve.runtime.batcher import Batcher, BatchLimits
from qaserve.runtime.device import default_batch_tokens
from qaserve.runtime.model import QAModel, WindowInput, WindowLogits
from qaserve.runtime.spec import ModelsConfig, ModelSpec

log = logging.getLogger(__name__)

# How long an evicted or unloaded model's in-flight requests get to finish before its batcher stops.
DRAIN_SECONDS = 30.0


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


@dataclass(frozen=True)
class Reconfigured:
    """What a reconfigure changed: model names added, removed and reloaded (a spec changed), the default if it
    changed, and the changed models whose new version failed to load (their old version keeps serving)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    reloaded: tuple[str, ...] = ()
    default: str | None = None
    failed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.reloaded or self.default or self.failed)

    def describe(self) -> str:
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("reloaded", self.reloaded),
                ("kept the old version of", self.failed),
            )
            if names
        ]
        if self.default:
            parts.append(f"default now {self.default}")
        return "; ".join(parts) or "no changes"


@dataclass
class _Entry:
    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    serving: ServingModel | None = None
    loading: asyncio.Task[ServingModel] | None = None
    error: str = ""
    last_used: float | None = None
    reserved: int = 0  # bytes held for a load in progress


class ModelRegistry:
    """Only the models named in the server's configuration can be requested; clients never pass paths.

    Concurrent first requests for a model share one load; loads run on a thread, so requests to loaded models
    keep flowing. Loading a model that does not fit evicts least-recently-used unpinned models (after their
    in-flight requests finish); if it still cannot fit, ModelTooLarge. A failed load leaves the model FAILED
    (requests get ModelFailed) until LoadModel retries it.

    Each model's batcher takes the spec's batching limits, the server-wide `limits` where the spec sets none.
    reconfigure() swaps in a new configuration while requests keep flowing.
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        default: str,
        limits: BatchLimits,
        metrics: Metrics,
        *,
        max_models: int = 4,
        max_bytes_per_device: int = 0,
        loader: Callable[[ModelSpec], QAModel] = load_model,
        estimate: Callable[[ModelSpec], int] = estimate_bytes,
        devices: Callable[[ModelSpec], list[str]] = plan_devices,
        on_state: Callable[[str, ModelState], None] | None = None,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        if default not in self.specs:
            raise ValueError(f"default model {default!r} is not among the configured models")
        self.default = default
        self.max_models = max_models
        self.max_bytes_per_device = max_bytes_per_device
        self._limits = limits
        self._metrics = metrics
        self._loader = loader
        self._estimate = estimate
        self._devices = devices
        self._on_state = on_state
        self._entries = {spec.name: _Entry(spec) for spec in specs}
        self._lru: OrderedDict[str, None] = OrderedDict()  # ready models, least recently used first
        self._seen_devices: set[str] = set()  # devices whose usage gauges were set, so they can drop to 0
        # Old versions of reloaded models and removed models, finishing their in-flight requests before they
        # close; their memory still counts against the budgets.
        self._retiring: dict[asyncio.Task[None], ServingModel] = {}
        self._reconfiguring = asyncio.Lock()
        self._closing = asyncio.Event()
        if metrics:
            for name in self._entries:
                metrics.set_model_state(name, ModelState.UNLOADED.value)

    # -- lookups ------------------------------------------------------------------------------------------------

    def spec(self, name: str) -> ModelSpec:
        """The configured spec for `name` ("" = default); ModelNotFound otherwise."""
        return self._entry(name).spec

    def label(self, name: str) -> str:
        """The metric label for a requested name: configured names only, so clients cannot grow cardinality."""
        name = name or self.default
        return name if name in self.specs else "unknown"

    def loaded(self, name: str) -> ServingModel | None:
        return self._entry(name).serving

    def info(self, name: str) -> ModelInfo:
        entry = self._entry(name)
        serving = entry.serving
        model = serving.model if serving else None
        return ModelInfo(
            name=entry.spec.name,
            state=entry.state,
            is_default=entry.spec.name == self.default,
            pinned=entry.spec.pinned,
            devices=tuple(model.devices) if model else (entry.spec.device,),
            dtype=model.dtype if model else "",
            bytes=model.nbytes if model else 0,
            revision=model.revision if model else "",
            last_used=entry.last_used,
            error=entry.error,
        )

    def infos(self) -> list[ModelInfo]:
        """Every configured model, the default first."""
        names = sorted(self._entries, key=lambda n: (n != self.default, n))
        return [self.info(n) for n in names]

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name or self.default)
        if entry is None:
            raise ModelNotFound(name, self.specs)
        return entry

    # -- the request path ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ServingModel]:
        """The serving model for a request, held (not evicted) until the block exits."""
        serving = await self.get(name)
        serving.active += 1
        serving.idle.clear()
        try:
            yield serving
        finally:
            serving.active -= 1
            if serving.active == 0:
                serving.idle.set()

    async def get(self, name: str) -> ServingModel:
        """The serving model for `name`, loading it on first use; a FAILED model raises ModelFailed."""
        entry = self._entry(name)
        entry.last_used = time.time()
        if entry.serving is not None:
            self._lru.move_to_end(entry.spec.name)
            self._metrics.model_cache_hits.labels(entry.spec.name).inc()
            return entry.serving
        if entry.state is ModelState.FAILED:
            raise ModelFailed(f"model {entry.spec.name!r} failed to load: {entry.error}")
        self._metrics.model_cache_misses.labels(entry.spec.name).inc()
        return await self._load(entry)

    # -- ModelService -------------------------------------------------------------------------------------------

    async def load(self, name: str) -> ModelInfo:
        """Loads (or retries) a configured model; returns its info once ready."""
        entry = self._entry(name)
        if entry.serving is None:
            if entry.state is ModelState.FAILED:
                entry.state, entry.error = ModelState.UNLOADED, ""
            await self._load(entry)
        return self.info(entry.spec.name)

    async def unload(self, name: str) -> ModelInfo:
        """Unloads a model after its in-flight requests finish; pinned models refuse."""
        entry = self._entry(name)
        if entry.spec.pinned:
            raise ModelPinned(f"model {entry.spec.name!r} is pinned and cannot be unloaded")
        if entry.loading is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(entry.loading)
        if entry.serving is not None:
            await self._evict(entry, reason="unload")
        elif entry.state is ModelState.FAILED:
            self._set_state(entry, ModelState.UNLOADED)
            entry.error = ""
        return self.info(entry.spec.name)

    async def preload(self) -> None:
        """Loads the models configured with preload (the default model always), failing start-up on errors."""
        for entry in list(self._entries.values()):
            if entry.spec.preload or entry.spec.name == self.default:
                await self.get(entry.spec.name)

    async def reconfigure(self, config: ModelsConfig) -> Reconfigured:
        """Serves `config` from now on, without failing a request in flight.

        New models are added (and loaded if preload). Removed ones stop taking requests at once (NOT_FOUND) and
        close once their in-flight requests finish. A model whose spec changed and that is loaded gets its new
        version loaded beside the old one where the cache has room, then requests switch to it and the old one
        closes once idle; without room, the old version drains first and the new one loads in its place, with
        requests waiting for it. A new version that fails to load leaves the old one serving (the next
        reconfigure tries again). Concurrent calls run one after another.
        """
        async with self._reconfiguring:
            if self._closing.is_set():
                return Reconfigured()
            new = {spec.name: spec for spec in config.models}
            if config.default not in new:
                raise ValueError(f"default model {config.default!r} is not among the configured models")
            added = [n for n in new if n not in self._entries]
            removed = [n for n in self._entries if n not in new]
            changed = [n for n in new if n in self._entries and self._entries[n].spec != new[n]]
            self.max_models, self.max_bytes_per_device = config.max_models, config.max_bytes_per_device
            for name in (*removed, *changed):  # a load in progress finishes first: its waiters get their model
                loading = self._entries[name].loading
                if loading is not None:
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.shield(loading)

            beside: dict[str, ServingModel] = {}
            failed: list[str] = []
            for name in changed:
                if self._entries[name].serving is None:
                    continue
                try:
                    version = await self._load_beside(new[name], list(beside.values()))
                except Exception as exc:
                    log.error(
                        "model %s: the new version failed to load (%s); the old version keeps serving",
                        name,
                        _describe(exc, new[name]),
                    )
                    failed.append(name)
                    continue
                if version is not None:
                    beside[name] = version

            # The swap, with no await inside: every request sees either the old configuration or the new one.
            old_default = self.default
            for name in removed:
                entry = self._entries[name]
                self._set_state(entry, ModelState.UNLOADED)
                del self._entries[name]
                self._lru.pop(name, None)
                if entry.serving is not None:
                    self._retire(entry.serving, "removed")
                    entry.serving = None
                if self._metrics:
                    self._metrics.forget_model(name)
            for name in added:
                self._entries[name] = _Entry(new[name])
                self._set_state(self._entries[name], ModelState.UNLOADED)
            for name in changed:
                if name in failed:
                    continue
                old = self._entries[name]
                fresh = _Entry(new[name], last_used=old.last_used)
                self._entries[name] = fresh
                if name in beside:
                    fresh.serving = beside[name]
                    self._lru[name] = None
                    self._lru.move_to_end(name)
                    self._set_state(fresh, ModelState.READY)
                    if old.serving is not None:  # (else evicted by a request's load while the new one loaded)
                        self._retire(old.serving, "reloaded")
                elif old.serving is not None:  # no room for both: the old version drains, then the new one loads
                    self._lru.pop(name, None)
                    self._set_state(fresh, ModelState.LOADING)
                    fresh.loading = asyncio.create_task(
                        self._load_after(self._retire(old.serving, "reloading"), fresh), name=f"load-{name}"
                    )
                else:
                    self._set_state(fresh, ModelState.UNLOADED)
            self._entries = {name: self._entries[name] for name in new}
            self.specs = {name: entry.spec for name, entry in self._entries.items()}
            self.default = config.default
            self._update_usage()

            for name, entry in self._entries.items():
                wanted = entry.spec.preload or name == self.default or entry.loading is not None
                if wanted and entry.serving is None and entry.state is not ModelState.FAILED:
                    try:
                        await self.get(name)
                    except (ModelFailed, ModelTooLarge, ModelNotReady) as error:
                        log.error("model %s did not load: %s", name, error)
            return Reconfigured(
                added=tuple(added),
                removed=tuple(removed),
                reloaded=tuple(n for n in changed if n not in failed),
                default=self.default if self.default != old_default else None,
                failed=tuple(failed),
            )

    async def retired(self) -> None:
        """Waits until the old versions of reloaded models and the removed models have closed."""
        while self._retiring:
            await asyncio.wait(list(self._retiring))

    async def close(self) -> None:
        """Stops every batcher and frees the models."""
        self._closing.set()  # retiring models stop waiting for their requests
        for entry in self._entries.values():
            if entry.loading is not None:
                entry.loading.cancel()
        for entry in list(self._entries.values()):
            if entry.serving is not None:
                await self._evict(entry, reason="shutdown", drain=0.0)
        await self.retired()

    # -- loading and eviction -----------------------------------------------------------------------------------

    async def _load(self, entry: _Entry) -> ServingModel:
        if entry.loading is None:
            entry.loading = asyncio.create_task(self._do_load(entry), name=f"load-{entry.spec.name}")
        try:
            return await asyncio.shield(entry.loading)
        except (ModelTooLarge, ModelFailed):
            raise
        except asyncio.CancelledError:
            if entry.loading is not None and entry.loading.cancelled():
                raise ModelNotReady(f"model {entry.spec.name!r} load was cancelled") from None
            raise

    async def _do_load(self, entry: _Entry) -> ServingModel:
        spec = entry.spec
        self._set_state(entry, ModelState.LOADING)
        started = time.perf_counter()
        try:
            devices = await asyncio.to_thread(self._devices, spec)
            entry.reserved = await asyncio.to_thread(self._estimate, spec)
            await self._make_room(entry, devices, entry.reserved)
            serving = await self._start(spec)
            model = serving.model
            if self._entries.get(spec.name) is not entry:  # removed or replaced by a reconfigure meanwhile
                await self._close_serving(serving)
                raise ModelNotReady(f"model {spec.name!r} was reconfigured while it loaded; retry")
            entry.serving, entry.error = serving, ""
            self._lru[spec.name] = None
            self._set_state(entry, ModelState.READY)
            self._metrics.model_load_duration.labels(spec.name).observe(time.perf_counter() - started)
            entry.reserved = 0
            self._update_usage()
            try:  # measured bytes can exceed the estimate: make room for what it really takes, or give up
                await self._make_room(entry, model.devices, model.nbytes)
            except ModelTooLarge:
                await self._evict(entry, reason="too large", drain=0.0)
                raise
            return serving
        except (ModelTooLarge, ModelNotReady, asyncio.CancelledError):
            self._set_state(entry, ModelState.UNLOADED)
            raise
        except Exception as exc:
            entry.error = _describe(exc, spec)
            log.exception("model %s failed to load", spec.name)
            self._set_state(entry, ModelState.FAILED)
            raise ModelFailed(f"model {spec.name!r} failed to load: {entry.error}") from exc
        finally:
            entry.loading = None
            entry.reserved = 0

    async def _start(self, spec: ModelSpec) -> ServingModel:
        """Loads a model (on a thread) and starts its batcher."""
        log.info("loading model %s", spec.name)
        model = await asyncio.to_thread(self._loader, spec)
        batcher: Batcher[WindowInput, WindowLogits] = Batcher(
            spec.name, model.replicas, self.batch_limits(spec, model.devices[0]), self._metrics
        )
        batcher.start()
        serving = ServingModel(model, batcher)
        serving.idle.set()
        return serving

    def batch_limits(self, spec: ModelSpec, device: str) -> BatchLimits:
        """The spec's batching limits, the server-wide ones where it sets none; max_tokens 0 = by device."""
        limits = BatchLimits(
            max_windows=spec.max_batch_windows if spec.max_batch_windows is not None else self._limits.max_windows,
            max_tokens=spec.max_batch_tokens if spec.max_batch_tokens is not None else self._limits.max_tokens,
            max_wait=spec.max_wait_ms / 1000.0 if spec.max_wait_ms is not None else self._limits.max_wait,
        )
        if not limits.max_tokens:
            limits = dataclasses.replace(limits, max_tokens=default_batch_tokens(device))
        return limits

    async def _load_beside(self, spec: ModelSpec, beside: Sequence[ServingModel]) -> ServingModel | None:
        """A new version of a loaded model, loaded while the old one serves; None when the cache has no room for
        both (without evicting another model)."""
        devices = await asyncio.to_thread(self._devices, spec)
        need = await asyncio.to_thread(self._estimate, spec)
        loaded = sum(1 for e in self._entries.values() if e.serving or e.loading) + len(self._retiring)
        if loaded + len(beside) >= self.max_models:
            return None
        if self.max_bytes_per_device and any(
            self._used(d) + sum(s.model.nbytes for s in beside if d in s.model.devices) + need
            > self.max_bytes_per_device
            for d in devices
        ):
            return None
        return await self._start(spec)

    async def _load_after(self, retiring: asyncio.Task[None], entry: _Entry) -> ServingModel:
        await asyncio.shield(retiring)
        return await self._do_load(entry)

    def _retire(self, serving: ServingModel, reason: str) -> asyncio.Task[None]:
        """Closes a model no entry serves any more, once its in-flight requests finish."""
        task = asyncio.create_task(self._drain_and_close(serving, reason), name=f"retire-{serving.model.name}")
        self._retiring[task] = serving
        task.add_done_callback(self._retired)
        return task

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("closing an old model version failed: %s", error)
        self._update_usage()

    async def _drain_and_close(self, serving: ServingModel, reason: str) -> None:
        log.info("unloading model %s (%s) once its %d request(s) in flight finish", serving.model.name, reason,
                 serving.active)  # fmt: skip
        idle = asyncio.ensure_future(serving.idle.wait())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((idle, closing), timeout=DRAIN_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            closing.cancel()
        await self._close_serving(serving)

    @staticmethod
    async def _close_serving(serving: ServingModel) -> None:
        await serving.batcher.stop()
        await asyncio.to_thread(serving.model.close)

    async def _make_room(self, entry: _Entry, devices: Sequence[str], need: int) -> None:
        """Evicts least-recently-used unpinned models until `entry` fits the count and byte budgets."""
        while True:
            others = [e for e in self._entries.values() if e is not entry and (e.serving or e.loading)]
            over_count = len(others) + len(self._retiring) >= self.max_models
            over_bytes = bool(self.max_bytes_per_device) and any(
                self._used(d, exclude=entry) + need > self.max_bytes_per_device for d in devices
            )
            if not (over_count or over_bytes):
                return
            victim = next(
                (
                    self._entries[n]
                    for n in self._lru
                    if n != entry.spec.name and not self._entries[n].spec.pinned and self._entries[n].serving
                ),
                None,
            )
            if victim is None and self._retiring:  # models closing after a reconfigure free their room soon
                await asyncio.wait(list(self._retiring))
                continue
            if victim is None:
                what = f"{self.max_models} models" if over_count else f"{self.max_bytes_per_device} bytes per device"
                raise ModelTooLarge(
                    f"model {entry.spec.name!r} does not fit the model cache ({what}) even after evicting every "
                    "unpinned model"
                )
            await self._evict(victim, reason="evicted")

    async def _evict(self, entry: _Entry, reason: str, drain: float = DRAIN_SECONDS) -> None:
        serving = entry.serving
        if serving is None:
            return
        entry.serving = None
        self._lru.pop(entry.spec.name, None)
        self._set_state(entry, ModelState.UNLOADED)
        log.info("unloading model %s (%s)", entry.spec.name, reason)
        if drain:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(serving.idle.wait(), drain)
        await self._close_serving(serving)
        if reason == "evicted":
            self._metrics.model_cache_evictions.labels(entry.spec.name).inc()
        self._update_usage()

    def _used(self, device: str, exclude: _Entry | None = None) -> int:
        total = 0
        for e in self._entries.values():
            if e is exclude:
                continue
            if e.serving is not None and device in e.serving.model.devices:
                total += e.serving.model.nbytes
            total += e.reserved if e.loading is not None else 0
        total += sum(s.model.nbytes for s in self._retiring.values() if device in s.model.devices)
        return total

    def _set_state(self, entry: _Entry, state: ModelState) -> None:
        entry.state = state
        if self._entries.get(entry.spec.name) is not entry:  # removed or replaced: its name belongs to another
            return
        if self._metrics:
            self._metrics.set_model_state(entry.spec.name, state.value)
        if self._on_state is not None:
            self._on_state(entry.spec.name, state)

    def _update_usage(self) -> None:
        by_device: dict[str, tuple[int, int]] = {}
        serving = [e.serving for e in self._entries.values() if e.serving is not None]
        for s in [*serving, *self._retiring.values()]:
            for d in s.model.devices:
                count, nbytes = by_device.get(d, (0, 0))
                by_device[d] = (count + 1, nbytes + s.model.nbytes)
        for device in {*by_device, *self._seen_devices}:
            count, nbytes = by_device.get(device, (0, 0))
            self._metrics.models_loaded.labels(device).set(count)
            self._metrics.model_bytes.labels(device).set(nbytes)
        self._seen_devices.update(by_device)


def _describe(exc: BaseException, spec: ModelSpec) -> str:
    """A load failure in one line for operators and clients, without the server's filesystem paths."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = redact_host_details(text, (spec.source,))
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
