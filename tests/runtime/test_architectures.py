"""The architecture table of docs/models.md: each family as a tiny model answers on torch, ONNX fp32 and int8."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qaserve.qa import Answer, QAParams, QARequest
from qaserve.runtime import QAEngine, build_engine
from qaserve.runtime.backends import MANIFEST_FILE
from qaserve.runtime.spec import ModelsConfig, ModelSpec

from qaserve_testing import FAMILIES, Family, build_tiny_model, export_tiny_onnx

DOCS = Path(__file__).resolve().parents[2] / "docs" / "models.md"
QUESTION = "Wo liegt Zürich, und was fließt dort?"
# Accented letters, ß, CJK and an emoji: characters of 2, 3 and 4 UTF-8 bytes, some split across tokens.
CONTEXT = (
    "Der Fluss fließt durch Zürich; São Paulo liegt in Brasilien, 東京 in Japan 🗾. Ein Café für naïve Gäste "
    "öffnet um 1820 am Fluss, und die Mühle steht in Zürich."
)
# Short windows, so that the context spans several and answers are merged across them.
PARAMS = QAParams(top_k=3, max_seq_len=48, doc_stride=16)
VARIANTS = ("torch", "onnx-fp32", "onnx-int8")


@dataclass(frozen=True)
class FamilyModels:
    family: Family
    checkpoint: Path
    fp32: Path  # qaserve export
    int8: Path  # qaserve export --quantize int8


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    checkpoint = build_tiny_model(root / "checkpoint", name)
    return FamilyModels(
        FAMILIES[name],
        checkpoint,
        export_tiny_onnx(checkpoint, root / "fp32"),
        export_tiny_onnx(checkpoint, root / "int8", quantize="int8"),
    )


@pytest.fixture
async def engine(family_models: FamilyModels) -> AsyncIterator[QAEngine]:
    """The family's checkpoint on torch and its two exports on onnx, one engine."""
    specs = (
        ModelSpec("torch", str(family_models.checkpoint), backend="torch", device="cpu", warmup=False),
        ModelSpec("onnx-fp32", str(family_models.fp32), device="cpu", warmup=False),
        ModelSpec("onnx-int8", str(family_models.int8), device="cpu", warmup=False),
    )
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(ModelsConfig(specs, "torch"), executor=executor)
        yield engine
        await engine.registry.close()


async def answers(engine: QAEngine, model: str) -> tuple[Answer, ...]:
    return (await engine.answer(QARequest(QUESTION, CONTEXT, model=model, params=PARAMS))).answers


async def test_torch_and_onnx_fp32_give_the_same_answers(engine: QAEngine) -> None:
    by_torch = await answers(engine, "torch")
    by_onnx = await answers(engine, "onnx-fp32")
    assert len(by_torch) == len(by_onnx) == 3
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert (a.answer, a.start, a.end, a.byte_start, a.byte_end) == (
            b.answer,
            b.start,
            b.end,
            b.byte_start,
            b.byte_end,
        )
        assert a.score == pytest.approx(b.score, rel=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_offsets_are_whole_characters_on_token_boundaries(
    engine: QAEngine, family_models: FamilyModels, variant: str
) -> None:
    """On text of multi-byte characters, each answer is the context between its offsets, in characters and in UTF-8
    bytes, and begins and ends where the family's tokenizer puts a token boundary."""
    encoding = AutoTokenizer.from_pretrained(family_models.checkpoint)(CONTEXT, return_offsets_mapping=True)
    starts = {start for start, end in encoding["offset_mapping"] if end > start}
    ends = {end for start, end in encoding["offset_mapping"] if end > start}
    result = await answers(engine, variant)
    assert result
    for answer in result:
        assert answer.answer == CONTEXT[answer.start : answer.end]
        assert answer.byte_start == len(CONTEXT[: answer.start].encode())
        assert answer.byte_end == len(CONTEXT[: answer.end].encode())
        assert answer.start in starts and answer.end in ends, (answer, sorted(starts), sorted(ends))


async def test_exports_take_the_inputs_of_their_tokenizer_and_report_their_dtype(
    engine: QAEngine, family_models: FamilyModels
) -> None:
    """Families whose tokenizers give no token_type_ids export and serve without them."""
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if family_models.family.token_type_ids else [])
    for directory in (family_models.fp32, family_models.int8):
        assert json.loads((directory / MANIFEST_FILE).read_text())["inputs"] == expected
    for variant, dtype in zip(VARIANTS, ("float32", "float32", "int8"), strict=True):
        result = await engine.answer(QARequest(QUESTION, CONTEXT, model=variant))
        assert (result.model.name, result.model.dtype) == (variant, dtype)


def architecture_table() -> str:
    """The table docs/models.md shows, written from FAMILIES: what each family was tested with."""
    rows = [
        "| family (`model_type`) | tokenizer in the test | `token_type_ids` fed |",
        "| --- | --- | --- |",
    ]
    for family in FAMILIES.values():
        types = "yes" if family.token_type_ids else "no"
        rows.append(f"| `{family.model_type}` | {family.kind} (`{family.tokenizer}`) | {types} |")
    return "\n".join(rows) + "\n"


def test_docs_table_is_the_tested_families() -> None:
    assert architecture_table() in DOCS.read_text(encoding="utf-8"), (
        "docs/models.md should hold:\n" + architecture_table()
    )
