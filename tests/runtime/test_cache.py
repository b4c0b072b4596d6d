"""The response cache: keys, LRU by bytes, metrics, off at 0; and through the engine on a tiny real model."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from qaserve.errors import DeadlineTooShort
from qaserve.metrics import Metrics
from qaserve.qa import Answer, QAParams, QAProgress, QARequest, QAResult
from qaserve.qa.windowing import resolve_params
from qaserve.runtime import ModelRegistry, QAEngine
from qaserve.runtime.cache import CacheKey, ResponseCache, cache_key, entry_bytes
from qaserve.runtime.spec import ModelsConfig, ModelSpec

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, build_tiny_model

MODEL = "tiny"
REVISION = "sha256:0123"
PARAMS = resolve_params(QAParams(), 512)
LONG = " ".join(f"Line {i}: the river number {i} flows into lake {i % 7} near the town of Ålesund." for i in range(40))


def answers(text: str, n: int = 1) -> tuple[Answer, ...]:
    return tuple(Answer(f"{text} {i}", 0.5 / (i + 1), i, i + 5, i, i + 5) for i in range(n))


def key(
    question: str = "Who?",
    context: str = "Ada wrote it.",
    *,
    model: str = MODEL,
    revision: str = REVISION,
    params: QAParams = PARAMS,
) -> CacheKey:
    return cache_key(model, revision, params, question, context)


@dataclasses.dataclass
class Counted:
    cache: ResponseCache
    registry: CollectorRegistry

    def sample(self, name: str, model: str = MODEL) -> float:
        labels = {} if name == "qaserve_response_cache_bytes" else {"model": model}
        return self.registry.get_sample_value(name, labels) or 0.0


def counted(max_bytes: int) -> Counted:
    registry = CollectorRegistry()
    return Counted(ResponseCache(max_bytes, Metrics(registry)), registry)


# -- the cache ------------------------------------------------------------------------------------------------


def test_miss_then_hit() -> None:
    c = counted(1 << 20)

    assert c.cache.get(key()) is None
    c.cache.put(key(), answers("Ada"), windows=1)
    hit = c.cache.get(key())

    assert hit is not None
    assert (hit.answers, hit.windows) == (answers("Ada"), 1)
    assert c.sample("qaserve_response_cache_misses_total") == 1
    assert c.sample("qaserve_response_cache_hits_total") == 1
    assert c.sample("qaserve_response_cache_bytes") == c.cache.bytes == entry_bytes(key(), answers("Ada")) > 0


@pytest.mark.parametrize(
    "other",
    [
        key(model="other-model"),
        key(revision="sha256:4567"),
        key(params=dataclasses.replace(PARAMS, top_k=2)),
        key(params=dataclasses.replace(PARAMS, handle_impossible_answer=True)),
        key(params=dataclasses.replace(PARAMS, doc_stride=64)),
        key(question="Who? "),
        key(context="Ada wrote it. "),
    ],
    ids=["model", "revision", "top_k", "impossible", "doc_stride", "question", "context"],
)
def test_everything_that_decides_the_answer_is_in_the_key(other: CacheKey) -> None:
    c = counted(1 << 20)
    c.cache.put(key(), answers("Ada"), windows=1)

    assert c.cache.get(other) is None
    assert c.cache.get(key()) is not None


def test_key_holds_a_digest_of_the_context_not_the_context() -> None:
    context = "A context long enough to matter. " * 1000

    k = key(context=context)

    assert context not in k
    assert len(k.context_digest) == 16
    assert k == key(context="".join(context))  # equal text, equal key
    assert entry_bytes(k, answers("x")) == entry_bytes(key(context="short"), answers("x"))


def test_byte_bound_evicts_least_recently_used_first() -> None:
    size = entry_bytes(key("q0"), answers("a"))
    c = counted(3 * size)
    for name in ("q0", "q1", "q2"):
        c.cache.put(key(name), answers("a"), windows=1)
    assert c.cache.get(key("q0")) is not None  # q0 is now the most recently used; q1 the least

    c.cache.put(key("q3"), answers("a"), windows=1)

    assert c.cache.get(key("q1")) is None
    assert all(c.cache.get(key(name)) is not None for name in ("q0", "q2", "q3"))
    assert c.sample("qaserve_response_cache_evictions_total") == 1
    assert c.cache.bytes == c.sample("qaserve_response_cache_bytes") == 3 * size
    assert len(c.cache) == 3


def test_a_larger_entry_evicts_as_many_as_it_needs() -> None:
    small = entry_bytes(key("q0"), answers("a"))
    c = counted(4 * small)
    for name in ("q0", "q1", "q2", "q3"):
        c.cache.put(key(name), answers("a"), windows=1)

    big = answers("a much longer answer text " * 10, n=3)
    c.cache.put(key("big"), big, windows=2)

    assert c.cache.bytes <= c.cache.max_bytes
    assert c.cache.get(key("big")) is not None
    assert c.cache.get(key("q0")) is None
    assert c.sample("qaserve_response_cache_evictions_total") == 4 - (len(c.cache) - 1)


def test_an_entry_larger_than_the_cache_is_not_stored() -> None:
    c = counted(4000)
    c.cache.put(key("small"), answers("a"), windows=1)
    huge = answers("x" * 5000)

    c.cache.put(key("huge"), huge, windows=1)

    assert c.cache.get(key("huge")) is None
    assert c.cache.get(key("small")) is not None  # nothing was evicted for an entry that could never fit
    assert c.sample("qaserve_response_cache_evictions_total") == 0


def test_storing_a_key_again_replaces_it_without_counting_twice() -> None:
    c = counted(1 << 20)
    c.cache.put(key(), answers("old"), windows=1)
    c.cache.put(key(), answers("new", n=2), windows=1)

    hit = c.cache.get(key())
    assert hit is not None and hit.answers == answers("new", n=2)
    assert c.cache.bytes == entry_bytes(key(), answers("new", n=2))
    assert len(c.cache) == 1


def test_zero_bytes_turns_the_cache_off() -> None:
    c = counted(0)

    c.cache.put(key(), answers("Ada"), windows=1)

    assert not c.cache.enabled
    assert c.cache.get(key()) is None
    assert len(c.cache) == 0
    assert c.sample("qaserve_response_cache_misses_total") == 0  # an absent cache counts nothing
    assert c.sample("qaserve_response_cache_hits_total") == 0


def test_negative_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ResponseCache(-1, Metrics(CollectorRegistry()))


def test_byte_estimate_does_not_undercount_what_entries_hold() -> None:
    cache = ResponseCache(1 << 30, Metrics(CollectorRegistry()))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(500):
            params = resolve_params(QAParams(top_k=1 + i % 5), 512)
            k = cache_key(MODEL, REVISION, params, f"What happened in year {i}?", f"In year {i} nothing. " * 20)
            cache.put(k, answers(f"answer {i}", n=params.top_k), windows=1)
        del k, params
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert held * 0.8 <= cache.bytes <= held * 2, (held, cache.bytes)


# -- through the engine ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    engine: QAEngine
    registry: ModelRegistry
    metrics: CollectorRegistry

    def sample(self, name: str) -> float:
        return self.metrics.get_sample_value(name, {"model": MODEL}) or 0.0


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model this test may rewrite."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))


@pytest.fixture
async def served(model_dir: Path, executor: ThreadPoolExecutor) -> AsyncIterator[Served]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    models = ModelRegistry([ModelSpec(MODEL, str(model_dir), device="cpu")], MODEL, metrics)
    engine = QAEngine(models, executor=executor, metrics=metrics, cache=ResponseCache(1 << 20, metrics))
    yield Served(engine, models, registry)
    await models.close()


async def test_a_repeated_request_is_answered_from_the_cache(served: Served) -> None:
    request = QARequest(SEED_QUESTION, SEED_CONTEXT, params=QAParams(top_k=3))

    first = await served.engine.answer(request)
    again = await served.engine.answer(request)

    assert not first.timing.cached
    assert first.timing.forward > 0
    assert again.timing.cached
    assert (again.timing.tokenize, again.timing.queue, again.timing.forward, again.timing.decode) == (0, 0, 0, 0)
    assert again.timing.total >= 0
    assert (again.answers, again.model, again.windows) == (first.answers, first.model, first.windows)
    assert served.sample("qaserve_response_cache_misses_total") == 1
    assert served.sample("qaserve_response_cache_hits_total") == 1
    forwards = served.metrics.get_sample_value(
        "qaserve_forward_duration_seconds_count", {"model": MODEL, "device": "cpu"}
    )
    assert forwards == 1  # the hit ran no forward pass


async def test_the_default_model_name_and_its_own_name_share_entries(served: Served) -> None:
    await served.engine.answer(QARequest(SEED_QUESTION, SEED_CONTEXT, model=""))

    named = await served.engine.answer(QARequest(SEED_QUESTION, SEED_CONTEXT, model=MODEL))

    assert named.timing.cached


async def test_different_parameters_or_inputs_are_not_served_from_the_cache(served: Served) -> None:
    await served.engine.answer(QARequest(SEED_QUESTION, SEED_CONTEXT))

    others = [
        QARequest(SEED_QUESTION, SEED_CONTEXT, params=QAParams(top_k=2)),
        QARequest(SEED_QUESTION, SEED_CONTEXT, params=QAParams(max_answer_len=3)),
        QARequest("What is the capital?", SEED_CONTEXT),
        QARequest(SEED_QUESTION, SEED_CONTEXT + " It is large."),
    ]
    results = [await served.engine.answer(request) for request in others]

    assert not any(result.timing.cached for result in results)
    assert served.sample("qaserve_response_cache_hits_total") == 0


async def test_a_new_revision_of_the_model_never_serves_an_old_answer(served: Served, model_dir: Path) -> None:
    request = QARequest(SEED_QUESTION, SEED_CONTEXT, params=QAParams(top_k=5))
    old = await served.engine.answer(request)
    assert (await served.engine.answer(request)).timing.cached

    await served.registry.unload(MODEL)
    build_tiny_model(model_dir, seed=7)  # new weights in the same place
    await served.registry.load(MODEL)
    new = await served.engine.answer(request)

    assert new.model.revision != old.model.revision
    assert not new.timing.cached
    assert new.answers != old.answers  # different weights, different scores
    assert served.sample("qaserve_response_cache_misses_total") == 2
    assert (await served.engine.answer(request)).answers == new.answers


async def test_progressive_on_a_hit_sends_only_the_final_result(served: Served) -> None:
    request = QARequest("Which lake does river 12 flow into?", LONG, params=QAParams(max_seq_len=64, doc_stride=16))

    first = [update async for update in served.engine.answer_progressive(request)]
    again = [update async for update in served.engine.answer_progressive(request)]
    unary = await served.engine.answer(request)

    assert any(isinstance(update, QAProgress) for update in first)
    assert isinstance(first[-1], QAResult) and not first[-1].timing.cached
    [final] = again
    assert isinstance(final, QAResult) and final.timing.cached
    assert final.answers == first[-1].answers == unary.answers
    assert unary.timing.cached


async def test_a_failed_request_is_not_cached(served: Served) -> None:
    request = QARequest(SEED_QUESTION, SEED_CONTEXT)

    with pytest.raises(DeadlineTooShort):  # a deadline long past: refused before any forward pass
        await served.engine.answer(request, deadline=0.0)
    result = await served.engine.answer(request)

    assert not result.timing.cached
    assert len(served.engine.cache) == 1


async def test_the_same_weights_run_another_way_never_serve_an_old_answer(served: Served, model_dir: Path) -> None:
    request = QARequest(SEED_QUESTION, SEED_CONTEXT, params=QAParams(top_k=5))
    old = await served.engine.answer(request)
    assert (await served.engine.answer(request)).timing.cached

    # Reloaded in bfloat16: the weights' revision is the same, the numbers they give are not.
    spec = ModelSpec(MODEL, str(model_dir), device="cpu", dtype="bfloat16")
    await served.registry.reconfigure(ModelsConfig((spec,), MODEL))
    await served.registry.load(MODEL)
    new = await served.engine.answer(request)

    assert (new.model.revision, new.model.dtype) == (old.model.revision, "bfloat16")
    assert not new.timing.cached
    assert (await served.engine.answer(request)).timing.cached
