"""The model cache: configured models by name, loaded on demand (once, off the event loop), kept in an LRU
bounded by count and by bytes per device, pinned ones never evicted; reconfigured in place on reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence

from qaserve.errors import ModelFailed, ModelNotFound, ModelNotReady, ModelPinned, ModelTooLarge
from qaserve.metrics import Metrics
from qaserve.runtime.budget import Budget, Holding
from qaserve.runtime.cache_entry import CacheEntry, ModelInfo, ModelState, Retiring, ServingModel, describe_failure
from qaserve.runtime.model import Loader, ModelLoader
from qaserve.runtime.reconfigure import Reconfigured, plan_reconfigure
from qaserve.runtime.spec import ModelsConfig, ModelSpec

log = logging.getLogger(__name__)

# How long an evicted or unloaded model's in-flight requests get to finish before its batcher stops.
DRAIN_SECONDS = 30.0


class ModelRegistry:
    """Only the models named in the server's configuration can be requested; clients never pass paths.

    Concurrent first requests for a model share one load; loads run on a thread, so requests to loaded models
    keep flowing. Loading a model that does not fit evicts least-recently-used unpinned models (after their
    in-flight requests finish); if it still cannot fit, ModelTooLarge. A failed load leaves the model FAILED
    (requests get ModelFailed) until LoadModel retries it.

    Each model's batcher takes its spec's batching limits. reconfigure() swaps in a new configuration while
    requests keep flowing.
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        default: str,
        metrics: Metrics,
        *,
        max_models: int = 4,
        max_bytes_per_device: int = 0,
        loader: Loader | None = None,
        on_state: Callable[[str, ModelState], None] | None = None,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        if default not in self.specs:
            raise ValueError(f"default model {default!r} is not among the configured models")
        self.default = default
        self.budget = Budget(max_models, max_bytes_per_device)
        self._metrics = metrics
        self._loader = loader if loader is not None else ModelLoader()
        self._on_state = on_state
        self._entries = {spec.name: CacheEntry(spec) for spec in specs}
        self._lru: OrderedDict[str, None] = OrderedDict()  # ready models, least recently used first
        self._reconfiguring = asyncio.Lock()
        self._closing = asyncio.Event()
        self._retiring = Retiring(DRAIN_SECONDS, self._closing, on_closed=self._update_usage)
        for name in self._entries:
            metrics.add_model(name)
            metrics.set_model_state(name, ModelState.UNLOADED.value)

    @property
    def max_models(self) -> int:
        return self.budget.max_models

    @property
    def max_bytes_per_device(self) -> int:
        return self.budget.max_bytes_per_device

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
        return entry.info(is_default=entry.spec.name == self.default)

    def infos(self) -> list[ModelInfo]:
        """Every configured model, the default first."""
        names = sorted(self._entries, key=lambda n: (n != self.default, n))
        return [self.info(n) for n in names]

    def _entry(self, name: str) -> CacheEntry:
        entry = self._entries.get(name or self.default)
        if entry is None:
            raise ModelNotFound(name, self.specs)
        return entry

    # -- the request path ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ServingModel]:
        """The serving model for a request, held (not evicted) until the block exits."""
        with (await self.get(name)).hold() as serving:
            yield serving

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
            plan = plan_reconfigure(self.specs, config)
            new = {spec.name: spec for spec in config.models}
            added, removed, changed = plan.added, plan.removed, plan.changed
            self.budget = Budget(config.max_models, config.max_bytes_per_device)
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
                        describe_failure(exc, new[name]),
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
                    self._retiring.retire(entry.serving, "removed")
                    entry.serving = None
                self._metrics.forget_model(name)
            for name in added:
                self._metrics.add_model(name)
                self._entries[name] = CacheEntry(new[name])
                self._set_state(self._entries[name], ModelState.UNLOADED)
            for name in changed:
                if name in failed:
                    continue
                old = self._entries[name]
                fresh = CacheEntry(new[name], last_used=old.last_used)
                self._entries[name] = fresh
                if name in beside:
                    fresh.serving = beside[name]
                    self._lru[name] = None
                    self._lru.move_to_end(name)
                    self._set_state(fresh, ModelState.READY)
                    if old.serving is not None:  # (else evicted by a request's load while the new one loaded)
                        self._retiring.retire(old.serving, "reloaded")
                elif old.serving is not None:  # no room for both: the old version drains, then the new one loads
                    self._lru.pop(name, None)
                    self._set_state(fresh, ModelState.LOADING)
                    fresh.loading = asyncio.create_task(
                        self._load_after(self._retiring.retire(old.serving, "reloading"), fresh), name=f"load-{name}"
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
                added=added,
                removed=removed,
                reloaded=tuple(n for n in changed if n not in failed),
                default=self.default if self.default != old_default else None,
                failed=tuple(failed),
            )

    async def retired(self) -> None:
        """Waits until the old versions of reloaded models and the removed models have closed."""
        await self._retiring.wait_all()

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

    async def _load(self, entry: CacheEntry) -> ServingModel:
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

    async def _do_load(self, entry: CacheEntry) -> ServingModel:
        spec = entry.spec
        self._set_state(entry, ModelState.LOADING)
        started = time.perf_counter()
        try:
            plan = await asyncio.to_thread(self._loader.plan, spec)
            entry.reserved, entry.reserved_on = plan.nbytes, plan.devices
            await self._make_room(entry, plan.devices, plan.nbytes)
            serving = await self._start(plan.spec)
            model = serving.model
            if self._entries.get(spec.name) is not entry:  # removed or replaced by a reconfigure meanwhile
                await serving.close()
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
            entry.error = describe_failure(exc, spec)
            log.exception("model %s failed to load", spec.name)
            self._set_state(entry, ModelState.FAILED)
            raise ModelFailed(f"model {spec.name!r} failed to load: {entry.error}") from exc
        finally:
            entry.loading = None
            entry.reserved = 0

    async def _start(self, spec: ModelSpec) -> ServingModel:
        """Loads a model (on a thread) and starts its batcher."""
        log.info("loading model %s", spec.name)
        model = await asyncio.to_thread(self._loader.load, spec)
        return ServingModel.start(model, self._metrics)

    async def _load_beside(self, spec: ModelSpec, beside: Sequence[ServingModel]) -> ServingModel | None:
        """A new version of a loaded model, loaded while the old one serves; None when the cache has no room for
        both (without evicting another model)."""
        plan = await asyncio.to_thread(self._loader.plan, spec)
        if not self.budget.fits([*self._holdings(), *(s.holding() for s in beside)], plan.devices, plan.nbytes):
            return None
        return await self._start(plan.spec)

    async def _load_after(self, retiring: asyncio.Task[None], entry: CacheEntry) -> ServingModel:
        await asyncio.shield(retiring)
        return await self._do_load(entry)

    async def _make_room(self, entry: CacheEntry, devices: Sequence[str], need: int) -> None:
        """Evicts least-recently-used unpinned models until `entry` fits the count and byte budgets."""
        while shortfall := self.budget.shortfall(self._holdings(exclude=entry), devices, need):
            lru = (self._entries[n].holding() for n in self._lru if n != entry.spec.name)
            victim = self.budget.victim(h for h in lru if h is not None)
            if victim is None and self._retiring:  # models closing after a reconfigure free their room soon
                await self._retiring.wait_any()
                continue
            if victim is None:
                raise ModelTooLarge(
                    f"model {entry.spec.name!r} does not fit the model cache ({shortfall}) even after evicting every "
                    "unpinned model"
                )
            await self._evict(self._entries[victim], reason="evicted")

    async def _evict(self, entry: CacheEntry, reason: str, drain: float = DRAIN_SECONDS) -> None:
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
        await serving.close()
        if reason == "evicted":
            self._metrics.model_cache_evictions.labels(entry.spec.name).inc()
        self._update_usage()

    def _holdings(self, exclude: CacheEntry | None = None) -> list[Holding]:
        """What takes room in the cache now: models loaded or loading (but `exclude`), and those closing."""
        held = [h for e in self._entries.values() if e is not exclude and (h := e.holding()) is not None]
        return held + self._retiring.holdings()

    def _set_state(self, entry: CacheEntry, state: ModelState) -> None:
        entry.state = state
        if self._entries.get(entry.spec.name) is not entry:  # removed or replaced: its name belongs to another
            return
        self._metrics.set_model_state(entry.spec.name, state.value)
        if self._on_state is not None:
            self._on_state(entry.spec.name, state)

    def _update_usage(self) -> None:
        loaded = [h for e in self._entries.values() if e.serving is not None and (h := e.holding()) is not None]
        self._metrics.set_model_usage(self.budget.usage([*loaded, *self._retiring.holdings()]))
