"""The engine's reader on a tiny model: one batch for every passage, cancellation, response cache, bad passages."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from qaserve.errors import InvalidArgument
from qaserve.metrics import Metrics
from qaserve.qa import Passage, QAParams, QARequest, ReadParams, ReadRequest, ScoreMode
from qaserve.runtime import ModelRegistry, QAEngine, ResponseCache
from qaserve.runtime.spec import ModelSpec

PATIENCE = 5.0
QUESTION = "Which lake does river 4 flow into?"
PASSAGES = tuple(
    Passage(" ".join(f"River {i}{j} flows into lake {j} near the town of Ålesund." for j in range(8)), f"doc-{i}")
    for i in range(5)
)
# Small windows, so that each passage needs several.
PARAMS = QAParams(max_seq_len=48, doc_stride=8, top_k=3)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@contextlib.asynccontextmanager
async def tiny_engine(
    model_dir: Path, executor: ThreadPoolExecutor, max_windows: int, replicas: int = 0
) -> AsyncIterator[QAEngine]:
    metrics = Metrics(CollectorRegistry())
    spec = ModelSpec("tiny", str(model_dir), device="cpu", max_batch_windows=max_windows, replicas_per_device=replicas)
    models = ModelRegistry([spec], "tiny", metrics)
    await models.preload()
    yield QAEngine(models, executor=executor, metrics=metrics, cache=ResponseCache(1 << 20, metrics), max_passages=8)
    await models.close()


@pytest.fixture
async def engine(tiny_model_dir: Path, executor: ThreadPoolExecutor) -> AsyncIterator[QAEngine]:
    async with tiny_engine(tiny_model_dir, executor, max_windows=256) as built:
        yield built


def forward_passes(engine: QAEngine) -> tuple[float, float]:
    """(forward passes, windows they carried) so far."""
    sample = engine.metrics.registry.get_sample_value
    count = sample("qaserve_batch_windows_count", {"model": "tiny"}) or 0.0
    return count, sample("qaserve_batch_windows_sum", {"model": "tiny"}) or 0.0


async def test_every_window_of_every_passage_runs_once_through_the_models_batcher(engine: QAEngine) -> None:
    result = await engine.read(ReadRequest(QUESTION, PASSAGES, params=PARAMS))
    read_windows = forward_passes(engine)[1]

    per_passage = [(await engine.answer(QARequest(QUESTION, p.text, params=PARAMS))).windows for p in PASSAGES]
    assert all(windows > 1 for windows in per_passage)
    assert result.windows == sum(per_passage) == read_windows  # batched as the device's policy says (policy.py)
    assert len(result.answers) == 3
    for answer in result.answers:
        passage = PASSAGES[answer.passage_index]
        assert answer.passage_id == passage.id
        assert passage.text[answer.start : answer.end] == answer.answer
        assert 0.0 < answer.score < 1.0  # calibrated: a sigmoid
    assert result.score_mode is ScoreMode.CALIBRATED


async def test_pipeline_mode_answers_each_passage_as_answer_does(engine: QAEngine) -> None:
    request = ReadRequest(QUESTION, PASSAGES, params=PARAMS, read=ReadParams(score_mode=ScoreMode.PIPELINE))
    result = await engine.read(request)

    for index, passage in enumerate(PASSAGES):
        alone = await engine.answer(QARequest(QUESTION, passage.text, params=PARAMS))
        mine = [(a.answer, a.score, a.start, a.end) for a in result.answers if a.passage_index == index]
        assert mine == [(a.answer, a.score, a.start, a.end) for a in alone.answers][: len(mine)]


async def test_a_cancelled_read_drops_its_unscored_windows(tiny_model_dir: Path, executor: ThreadPoolExecutor) -> None:
    async with tiny_engine(tiny_model_dir, executor, max_windows=2, replicas=1) as engine:
        serving = engine.registry.loaded("tiny")
        assert serving is not None
        release = threading.Event()
        # The replica's thread is held: the read's first batch (2 windows) waits on it, the rest in the queue.
        [replica] = serving.model.replicas
        replica.executor.submit(release.wait, PATIENCE)
        reading = asyncio.create_task(engine.read(ReadRequest(QUESTION, PASSAGES, params=PARAMS)))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + PATIENCE
        while serving.batcher.queued_windows == 0:
            assert loop.time() < give_up, "the read's windows never queued"
            await asyncio.sleep(0.01)
        assert serving.batcher.queued_windows > 2

        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        assert serving.batcher.queued_windows == 0
        release.set()
        while forward_passes(engine) == (0.0, 0.0):
            assert loop.time() < give_up, "the batch already taken never ran"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert forward_passes(engine) == (1.0, 2.0)  # the batch on its way ran; the queued windows never did
        assert engine.in_flight == 0
        assert (await engine.read(ReadRequest(QUESTION, PASSAGES[:1]))).answers  # and the engine keeps serving


async def test_the_response_cache_keys_on_the_whole_request(engine: QAEngine) -> None:
    request = ReadRequest(QUESTION, PASSAGES[:2], params=PARAMS, read=ReadParams(no_answer=True))
    first = await engine.read(request)
    again = await engine.read(request)
    assert again.timing.cached and not first.timing.cached
    assert (again.answers, again.no_answer_score, again.windows) == (
        first.answers,
        first.no_answer_score,
        first.windows,
    )

    swapped = ReadRequest(QUESTION, PASSAGES[1::-1], params=PARAMS, read=ReadParams(no_answer=True))
    renamed = ReadRequest(
        QUESTION, (PASSAGES[0], Passage(PASSAGES[1].text, "other")), params=PARAMS, read=ReadParams(no_answer=True)
    )
    pipeline = ReadRequest(
        QUESTION, PASSAGES[:2], params=PARAMS, read=ReadParams(no_answer=True, score_mode=ScoreMode.PIPELINE)
    )
    for different in (swapped, renamed, pipeline):
        assert not (await engine.read(different)).timing.cached
    assert not (await engine.answer(QARequest(QUESTION, PASSAGES[0].text, params=PARAMS))).timing.cached


async def test_too_many_passages_are_refused_before_any_work(engine: QAEngine) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await engine.read(ReadRequest(QUESTION, PASSAGES * 2))
    assert raised.value.field == "passages"
    assert forward_passes(engine) == (0.0, 0.0)


async def test_a_passage_without_tokens_is_named_by_its_index(engine: QAEngine) -> None:
    # U+0301 alone is visible to Python but an uncased WordPiece tokenizer drops it.
    with pytest.raises(InvalidArgument) as raised:
        await engine.read(ReadRequest(QUESTION, (PASSAGES[0], Passage("\u0301"))))
    assert raised.value.field == "passages[1].text"
