"""The model cache with counted, controllable fake models: LRU by count and bytes, pinning, single-flight, failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from qaserve.errors import ModelFailed, ModelNotFound, ModelPinned, ModelTooLarge
from qaserve.metrics import Metrics
from qaserve.runtime import BatchLimits, ModelRegistry, ModelState
from qaserve.runtime.device import default_batch_tokens
from qaserve.runtime.model import LoadPlan
from qaserve.runtime.spec import ModelsConfig, ModelSpec

from qaserve_testing import FakeReplica, eventually

MB = 1_000_000


class FakeModel:
    """What the registry needs of a QAModel: replicas, solo, devices, bytes, revision, dtype, close()."""

    def __init__(self, spec: ModelSpec, nbytes: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.replicas = [FakeReplica(spec.name)]
        self.solo = None
        self.devices = ["cpu"]
        self.nbytes = nbytes
        self.revision = f"rev-{spec.name}"
        self.dtype = "float32"
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for r in self.replicas:
            r.close()


@dataclass
class Loader:
    """Counts loads per model; sizes, failures and a gate that holds loads are set per test."""

    sizes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # name -> loads left that raise
    gate: threading.Event = field(default_factory=threading.Event)
    calls: dict[str, int] = field(default_factory=dict)
    models: dict[str, FakeModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gate.set()

    def plan(self, spec: ModelSpec) -> LoadPlan:
        return LoadPlan(spec, ("cpu",), self.sizes.get(spec.name, 100 * MB))

    def load(self, spec: ModelSpec) -> FakeModel:
        self.calls[spec.name] = self.calls.get(spec.name, 0) + 1
        self.gate.wait(10)
        if self.failures.get(spec.name, 0) > 0:
            self.failures[spec.name] -= 1
            raise OSError(f"corrupt weights in {spec.source}/model.safetensors")
        model = FakeModel(spec, self.sizes.get(spec.name, 100 * MB))
        self.models[spec.name] = model
        return model


Make = Callable[..., ModelRegistry]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[ModelRegistry] = []

    def build(loader: Loader, *specs: ModelSpec, max_models: int = 2, max_bytes: int = 0, **kw: Any) -> ModelRegistry:
        registry = ModelRegistry(
            list(specs),
            specs[0].name,
            Metrics(CollectorRegistry()),
            max_models=max_models,
            max_bytes_per_device=max_bytes,
            loader=loader,  # type: ignore[arg-type]
            **kw,
        )
        made.append(registry)
        return registry

    yield build
    for registry in made:
        await registry.close()


def specs(*names: str, pinned: tuple[str, ...] = ()) -> list[ModelSpec]:
    return [ModelSpec(name=n, source=f"/models/{n}", device="cpu", pinned=n in pinned) for n in names]


def states(registry: ModelRegistry) -> dict[str, ModelState]:
    return {info.name: info.state for info in registry.infos()}


def sample(registry: ModelRegistry, name: str, labels: dict[str, str]) -> float:
    assert registry._metrics is not None
    return registry._metrics.registry.get_sample_value(name, labels) or 0.0


async def test_eviction_follows_least_recent_use(make: Make) -> None:
    loader = Loader()
    registry = make(loader, *specs("a", "b", "c"))
    await registry.get("a")
    await registry.get("b")
    await registry.get("a")  # b is now the least recently used
    await registry.get("c")
    assert states(registry) == {"a": ModelState.READY, "b": ModelState.UNLOADED, "c": ModelState.READY}
    assert loader.models["b"].closed
    await registry.get("b")  # a is older than c now
    assert states(registry) == {"a": ModelState.UNLOADED, "b": ModelState.READY, "c": ModelState.READY}
    assert sample(registry, "qaserve_model_cache_evictions_total", {"model": "b"}) == 1
    assert sample(registry, "qaserve_model_cache_hits_total", {"model": "a"}) == 1
    assert sample(registry, "qaserve_model_cache_misses_total", {"model": "b"}) == 2
    assert sample(registry, "qaserve_models_loaded", {"device": "cpu"}) == 2


async def test_pinned_models_are_never_evicted(make: Make) -> None:
    loader = Loader()
    registry = make(loader, *specs("a", "b", "c", "d", pinned=("a",)))
    for name in ("a", "b", "c", "d"):
        await registry.get(name)
    assert states(registry)["a"] is ModelState.READY
    assert loader.calls["a"] == 1
    with pytest.raises(ModelPinned):
        await registry.unload("a")


async def test_byte_budget_is_respected(make: Make) -> None:
    loader = Loader(sizes={"a": 100 * MB, "b": 100 * MB, "c": 150 * MB, "huge": 300 * MB})
    registry = make(loader, *specs("a", "b", "c", "huge"), max_models=10, max_bytes=250 * MB)
    await registry.get("a")
    await registry.get("b")
    await registry.get("c")  # 350 MB would not fit: the least recently used (a) goes
    assert states(registry)["a"] is ModelState.UNLOADED
    assert sample(registry, "qaserve_model_bytes", {"device": "cpu"}) == 250 * MB
    with pytest.raises(ModelTooLarge):
        await registry.get("huge")  # bigger than the whole budget
    assert states(registry)["huge"] is ModelState.UNLOADED
    assert "huge" not in loader.calls  # refused before reading any weights


async def test_when_only_pinned_models_remain_a_new_model_cannot_fit(make: Make) -> None:
    loader = Loader()
    registry = make(loader, *specs("a", "b", "c", pinned=("a", "b")))
    await registry.get("a")
    await registry.get("b")
    with pytest.raises(ModelTooLarge):
        await registry.get("c")
    assert states(registry) == {"a": ModelState.READY, "b": ModelState.READY, "c": ModelState.UNLOADED}


async def test_concurrent_first_requests_share_one_load(make: Make) -> None:
    loader = Loader()
    loader.gate.clear()
    registry = make(loader, *specs("a", "b"))
    requests = [asyncio.create_task(registry.get("b")) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert states(registry)["b"] is ModelState.LOADING
    loader.gate.set()
    served = await asyncio.gather(*requests)
    assert loader.calls == {"b": 1}
    assert all(s is served[0] for s in served)


async def test_a_slow_load_does_not_stall_loaded_models(make: Make) -> None:
    loader = Loader()
    registry = make(loader, *specs("a", "b"))
    await registry.get("a")
    loader.gate.clear()
    slow = asyncio.create_task(registry.get("b"))
    await asyncio.sleep(0.02)
    assert (await asyncio.wait_for(registry.get("a"), 1.0)).model.name == "a"  # type: ignore[attr-defined]
    loader.gate.set()
    await slow


async def test_load_failure_is_isolated_reported_and_retried(make: Make) -> None:
    loader = Loader(failures={"b": 1})
    registry = make(loader, *specs("a", "b"))
    await registry.get("a")
    with pytest.raises(ModelFailed) as caught:
        await registry.get("b")
    assert "OSError: corrupt weights" in str(caught.value)
    assert "/models/b" not in str(caught.value)  # the server's paths stay private
    info = registry.info("b")
    assert info.state is ModelState.FAILED and "corrupt weights" in info.error
    with pytest.raises(ModelFailed):
        await registry.get("b")  # requests do not retry on their own
    assert loader.calls["b"] == 1
    assert (await registry.get("a")).model.name == "a"  # type: ignore[attr-defined]

    retried = await registry.load("b")
    assert retried.state is ModelState.READY and retried.error == ""
    assert loader.calls["b"] == 2


async def test_eviction_waits_for_in_flight_requests(make: Make) -> None:
    loader = Loader()
    registry = make(loader, *specs("a", "b", "c"))
    await registry.get("a")
    order: list[str] = []
    release = asyncio.Event()

    async def long_request() -> None:
        async with registry.use("b"):
            order.append("request started")
            await release.wait()
            order.append("request finished")

    request = asyncio.create_task(long_request())
    await eventually(lambda: order == ["request started"], "the request to start")
    await registry.get("a")  # b is least recently used
    load_c = asyncio.create_task(registry.get("c"))
    await eventually(lambda: registry.info("b").state is ModelState.UNLOADED, "b to be chosen")  # draining
    await asyncio.sleep(0.05)
    assert not loader.models["b"].closed  # still serving its request
    assert not load_c.done()
    release.set()
    await request
    await load_c
    order.append("evicted" if loader.models["b"].closed else "still loaded")
    assert order == ["request started", "request finished", "evicted"]


async def test_unknown_names_read_nothing(make: Make) -> None:
    loader = Loader()
    registry = make(loader, *specs("a"))
    for name in ("nope", "../a", "/models/a", "org/model"):
        with pytest.raises(ModelNotFound):
            await registry.get(name)
    assert loader.calls == {}


async def test_state_changes_are_reported(make: Make) -> None:
    seen: list[tuple[str, ModelState]] = []
    loader = Loader(failures={"b": 1})
    registry = make(loader, *specs("a", "b"), on_state=lambda n, s: seen.append((n, s)))
    await registry.get("a")
    with pytest.raises(ModelFailed):
        await registry.get("b")
    await registry.unload("a")
    assert seen == [
        ("a", ModelState.LOADING),
        ("a", ModelState.READY),
        ("b", ModelState.LOADING),
        ("b", ModelState.FAILED),
        ("a", ModelState.UNLOADED),
    ]


# -- per-model batching limits and reconfigure ------------------------------------------------------------------


def config(*models: ModelSpec, default: str | None = None, max_models: int = 2) -> ModelsConfig:
    return ModelsConfig(tuple(models), default or models[0].name, max_models=max_models)


def spec(name: str, **keys: Any) -> ModelSpec:
    return ModelSpec(name=name, source=f"/models/{name}", device="cpu", **keys)


async def test_each_batcher_takes_its_models_limits_with_the_devices_token_budget_and_policy(make: Make) -> None:
    loader = Loader()
    registry = make(loader, spec("a", max_batch_windows=4, max_wait_ms=10.0), spec("b", max_batch_tokens=2048))

    a = await registry.get("a")
    b = await registry.get("b")

    cpu = default_batch_tokens("cpu")
    assert a.batcher.limits == BatchLimits(max_windows=4, max_tokens=cpu, max_wait=0.01, spread=True)
    assert b.batcher.limits == BatchLimits(max_windows=32, max_tokens=2048, max_wait=0.002, spread=True)


async def test_reconfigure_adds_models_and_loads_those_to_preload(make: Make) -> None:
    loader = Loader()
    seen: list[tuple[str, ModelState]] = []
    registry = make(loader, spec("a"), on_state=lambda n, s: seen.append((n, s)))
    await registry.preload()

    changes = await registry.reconfigure(config(spec("a"), spec("b", preload=True), spec("c"), max_models=3))

    assert (changes.added, changes.removed, changes.reloaded) == (("b", "c"), (), ())
    assert states(registry) == {"a": ModelState.READY, "b": ModelState.READY, "c": ModelState.UNLOADED}
    assert loader.calls == {"a": 1, "b": 1}  # a unchanged: not reloaded
    assert ("c", ModelState.UNLOADED) in seen  # its health reads NOT_SERVING until it loads
    assert (await registry.get("c")).model.name == "c"  # type: ignore[attr-defined]
    assert registry.max_models == 3


async def test_a_removed_model_refuses_new_requests_and_closes_once_its_request_finishes(make: Make) -> None:
    loader = Loader()
    seen: list[tuple[str, ModelState]] = []
    registry = make(loader, spec("a"), spec("b"), on_state=lambda n, s: seen.append((n, s)))
    await registry.get("b")
    release = asyncio.Event()
    answered: list[str] = []

    async def long_request() -> None:
        async with registry.use("b") as serving:
            await release.wait()
            answered.append(serving.model.name)  # type: ignore[attr-defined]

    request = asyncio.create_task(long_request())
    await eventually(lambda: (b := registry.loaded("b")) is not None and b.active == 1, "b to be in use")

    changes = await registry.reconfigure(config(spec("a")))

    assert changes.removed == ("b",)
    with pytest.raises(ModelNotFound):
        await registry.get("b")
    assert [info.name for info in registry.infos()] == ["a"]
    metrics = registry._metrics.registry
    assert metrics.get_sample_value("qaserve_model_state", {"model": "b", "state": "unloaded"}) is None  # forgotten
    assert ("b", ModelState.UNLOADED) in seen  # its health reads NOT_SERVING
    await asyncio.sleep(0.05)
    assert not loader.models["b"].closed  # still answering its request
    release.set()
    await request
    await registry.retired()
    assert answered == ["b"] and loader.models["b"].closed
    assert sample(registry, "qaserve_models_loaded", {"device": "cpu"}) == 1  # a (the default) alone


async def test_a_changed_model_reloads_beside_the_old_one_without_failing_its_request(make: Make) -> None:
    loader = Loader()
    seen: list[tuple[str, ModelState]] = []
    registry = make(loader, spec("a"), on_state=lambda n, s: seen.append((n, s)))
    old = await registry.get("a")
    release = asyncio.Event()

    async def long_request() -> str:
        async with registry.use("a") as serving:
            await release.wait()
            return str(serving.model.spec.top_k)  # type: ignore[attr-defined]

    request = asyncio.create_task(long_request())
    await eventually(lambda: old.active == 1, "the old version to be in use")
    seen.clear()

    changes = await registry.reconfigure(config(spec("a", top_k=3, max_batch_windows=4)))

    assert changes.reloaded == ("a",)
    new = await registry.get("a")
    assert new is not old and new.model.spec.top_k == 3  # type: ignore[attr-defined]
    assert new.batcher.limits.max_windows == 4
    assert registry.spec("a").top_k == 3
    assert seen == [("a", ModelState.READY)]  # never LOADING nor UNLOADED: its health stays SERVING
    assert not old.model.closed  # type: ignore[attr-defined]
    release.set()
    assert await request == "None"  # the request in flight finished on the version it started with
    await registry.retired()
    assert old.model.closed  # type: ignore[attr-defined]
    assert not new.model.closed  # type: ignore[attr-defined]
    assert loader.calls == {"a": 2}


async def test_without_room_for_both_the_old_version_drains_and_requests_wait_for_the_new(make: Make) -> None:
    loader = Loader()
    registry = make(loader, spec("a"), max_models=1)
    old = await registry.get("a")
    release = asyncio.Event()

    async def long_request() -> None:
        async with registry.use("a"):
            await release.wait()

    request = asyncio.create_task(long_request())
    await eventually(lambda: old.active == 1, "the old version to be in use")
    reconfiguring = asyncio.create_task(registry.reconfigure(config(spec("a", top_k=2), max_models=1)))
    await eventually(lambda: registry.spec("a").top_k == 2, "the new configuration")
    waiting = asyncio.create_task(registry.get("a"))  # a new request waits for the new version
    await asyncio.sleep(0.05)
    assert not waiting.done() and loader.calls == {"a": 1}  # never two versions at once
    release.set()
    await request
    new = await waiting
    assert new.model.spec.top_k == 2 and old.model.closed  # type: ignore[attr-defined]
    assert (await reconfiguring).reloaded == ("a",)
    assert states(registry) == {"a": ModelState.READY}


async def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving(make: Make) -> None:
    loader = Loader()
    registry = make(loader, spec("a"))
    old = await registry.get("a")
    loader.failures["a"] = 1

    changes = await registry.reconfigure(config(spec("a", top_k=5)))

    assert changes.failed == ("a",) and changes.reloaded == ()
    assert await registry.get("a") is old and registry.spec("a").top_k is None
    assert states(registry) == {"a": ModelState.READY}
    assert (await registry.reconfigure(config(spec("a", top_k=5)))).reloaded == ("a",)  # the next reload retries


async def test_reconfigure_moves_the_default_and_loads_it(make: Make) -> None:
    loader = Loader()
    registry = make(loader, spec("a"), spec("b"))
    await registry.preload()

    changes = await registry.reconfigure(config(spec("a"), spec("b"), default="b"))

    assert changes.default == "b" and registry.default == "b"
    assert registry.info("b").is_default and registry.info("b").state is ModelState.READY
    assert (await registry.get("")).model.name == "b"  # type: ignore[attr-defined]


async def test_concurrent_reconfigures_apply_in_order(make: Make) -> None:
    loader = Loader()
    registry = make(loader, spec("a"))
    await registry.preload()

    first, second = await asyncio.gather(
        registry.reconfigure(config(spec("a"), spec("b"))),
        registry.reconfigure(config(spec("a"), spec("c"))),
    )

    assert (first.added, second.added, second.removed) == (("b",), ("c",), ("b",))
    assert [info.name for info in registry.infos()] == ["a", "c"]
