"""Real models end to end through the engine: the embedded default, and tiny random BERT/DistilBERT models."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qaserve.config import EMBEDDED_MODEL
from qaserve.errors import InvalidArgument, ModelNotFound
from qaserve.qa import QAParams, QARequest
from qaserve.runtime import QAEngine, build_engine
from qaserve.runtime.backends import MANIFEST_FILE, ONNX_FILE
from qaserve.runtime.backends.manifest import sha256_file
from qaserve.runtime.spec import ModelsConfig, ModelSpec

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION

LONG_CONTEXT = " ".join(
    f"Sentence {i} says that the café number {i} in Zürich opened in {1900 + i} 😀." for i in range(60)
)


async def make_engine(*specs: ModelSpec) -> AsyncIterator[QAEngine]:
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(ModelsConfig(specs, specs[0].name), executor=executor)
        yield engine
        await engine.registry.close()


@pytest.fixture(scope="module")
async def embedded_engine() -> AsyncIterator[QAEngine]:
    """The embedded model on the torch backend: the one with the transformers pipeline's exact scores."""
    async for engine in make_engine(
        ModelSpec("minilm", str(EMBEDDED_MODEL), backend="torch", device="cpu"),
        ModelSpec("minilm-onnx", str(EMBEDDED_MODEL), device="cpu"),
    ):
        yield engine


@pytest.fixture(scope="module")
async def tiny_engine(tiny_model_dir: Path, tiny_distilbert_dir: Path) -> AsyncIterator[QAEngine]:
    async for engine in make_engine(
        ModelSpec("tiny", str(tiny_model_dir), device="cpu"),
        ModelSpec("tiny-distilbert", str(tiny_distilbert_dir), device="cpu"),
    ):
        yield engine


async def test_embedded_model_answers_the_seed_question(embedded_engine: QAEngine) -> None:
    result = await embedded_engine.answer(QARequest(SEED_QUESTION, SEED_CONTEXT))
    [best] = result.answers
    assert (best.answer, best.start, best.end) == ("Paris", 54, 59)
    # The model card's score through the transformers 4.x pipeline is 0.576.
    assert best.score == pytest.approx(0.576, abs=0.001)
    assert result.model.name == "minilm"
    assert result.model.revision.startswith("sha256:c7c5b98c")
    assert (result.model.device, result.model.dtype) == ("cpu", "float32")
    assert result.windows == 1


async def test_embedded_model_serves_its_int8_onnx_file_by_default_on_cpu(embedded_engine: QAEngine) -> None:
    result = await embedded_engine.answer(QARequest(SEED_QUESTION, SEED_CONTEXT, model="minilm-onnx"))
    [best] = result.answers
    assert (best.answer, best.start, best.end) == ("Paris", 54, 59)
    assert best.score == pytest.approx(0.576, abs=0.05)  # int8 weights: close to, not exactly, the pipeline's
    assert (result.model.device, result.model.dtype) == ("cpu", "int8")
    manifest = json.loads((EMBEDDED_MODEL / MANIFEST_FILE).read_text())
    assert manifest["quantization"] == "int8"
    assert manifest["source_revision"].startswith("sha256:c7c5b98c")  # made from the weights the torch backend serves
    assert result.model.revision == sha256_file(EMBEDDED_MODEL / ONNX_FILE)


@pytest.mark.parametrize("model", ["tiny", "tiny-distilbert"])
async def test_long_context_splits_into_windows_with_consistent_offsets(tiny_engine: QAEngine, model: str) -> None:
    request = QARequest(
        "When did the café open?",
        LONG_CONTEXT,
        model=model,
        params=QAParams(top_k=20, max_seq_len=128, doc_stride=32),
    )
    result = await tiny_engine.answer(request)
    raw = LONG_CONTEXT.encode("utf-8")
    assert result.windows > 3
    assert len(result.answers) == 20
    for a in result.answers:
        assert a.answer == LONG_CONTEXT[a.start : a.end]
        assert raw[a.byte_start : a.byte_end].decode("utf-8") == a.answer
        assert 0 < a.score <= 1
    assert [a.score for a in result.answers] == sorted((a.score for a in result.answers), reverse=True)
    assert len({a.answer.lower() for a in result.answers}) == 20  # same-text spans were merged


async def test_batched_and_alone_give_the_same_answers(embedded_engine: QAEngine) -> None:
    import asyncio

    context = SEED_CONTEXT + " " + LONG_CONTEXT[:1500]
    questions = [SEED_QUESTION] + [f"When did café number {i} open?" for i in range(11)]
    alone = [await embedded_engine.answer(QARequest(q, context, params=QAParams(max_seq_len=128))) for q in questions]
    together = await asyncio.gather(
        *(embedded_engine.answer(QARequest(q, context, params=QAParams(max_seq_len=128))) for q in questions)
    )
    assert alone[0].windows > 1
    assert alone[0].answers[0].answer == "Paris"
    for a, b in zip(alone, together, strict=True):
        assert [x.answer for x in a.answers] == [x.answer for x in b.answers]
        assert a.answers[0].score == pytest.approx(b.answers[0].score, rel=1e-3)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (QAParams(max_seq_len=10_000), "max_seq_len"),
        (QAParams(max_seq_len=8), "max_seq_len"),
        (QAParams(max_seq_len=64, doc_stride=60), "doc_stride"),
        (QAParams(max_question_len=2), "question"),
    ],
)
async def test_model_dependent_limits_are_invalid_arguments(
    tiny_engine: QAEngine, params: QAParams, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await tiny_engine.answer(QARequest("What opened in the year 1901 in Zürich?", LONG_CONTEXT, "tiny", params))
    assert caught.value.field == field


async def test_question_longer_than_the_window_is_rejected(tiny_engine: QAEngine) -> None:
    question = "why " * 60
    params = QAParams(max_seq_len=32, max_question_len=64)
    with pytest.raises(InvalidArgument) as caught:
        await tiny_engine.answer(QARequest(question, LONG_CONTEXT, "tiny", params))
    assert caught.value.field == "question"


@pytest.mark.parametrize("name", ["nope", "../tiny", "/etc", "bert-base-uncased", "org/model"])
async def test_unconfigured_model_names_are_not_found(tiny_engine: QAEngine, name: str) -> None:
    with pytest.raises(ModelNotFound):
        await tiny_engine.answer(QARequest("q?", "some context", model=name))
