"""QAServeReader in a real Haystack Pipeline against a real qaserve; its scores against Haystack's own reader."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from haystack import Document, Pipeline
from haystack.dataclasses import ExtractedAnswer
from haystack_integrations.components.readers.transformers import TransformersExtractiveReader
from prometheus_client import CollectorRegistry

from qaserve.server import create_server
from qaserve_client.haystack import QAServeReader

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, tiny_settings

GERMANY = "Germany is a country in Central Europe. Its capital is Berlin, its largest city."
DOCUMENTS = [
    Document(content=SEED_CONTEXT, meta={"page_number": 3}),
    Document(content=None, id="no-content"),
    Document(content=GERMANY),
]


def run_pipeline(pipeline: Pipeline) -> list[ExtractedAnswer]:
    result = pipeline.run({"reader": {"query": SEED_QUESTION, "documents": DOCUMENTS}})
    answers: list[ExtractedAnswer] = result["reader"]["answers"]
    return answers


async def test_the_reader_answers_inside_a_pipeline(tiny_server: tuple[object, str]) -> None:
    pipeline = Pipeline()
    pipeline.add_component("reader", QAServeReader(tiny_server[1], top_k=4))

    answers = await asyncio.to_thread(run_pipeline, pipeline)

    found = [a for a in answers if a.data is not None]
    [no_answer] = [a for a in answers if a.data is None]
    assert len(found) == 4
    assert [a.score for a in answers] == sorted((a.score for a in answers), reverse=True)
    for answer in found:
        assert answer.query == SEED_QUESTION
        assert answer.document is not None and answer.document.id != "no-content"
        assert answer.document_offset is not None and answer.document.content is not None
        assert answer.document.content[answer.document_offset.start : answer.document_offset.end] == answer.data
        assert 0.0 < answer.score < 1.0
        if answer.document.content == SEED_CONTEXT:
            assert answer.meta == {"answer_page_number": 3}
    assert no_answer.score == pytest.approx(math.prod(1 - a.score for a in found))

    # A pipeline file round trip keeps the component and what it answers.
    reloaded = Pipeline.loads(pipeline.dumps(), allowed_modules=["qaserve_client.haystack"])
    assert [(a.data, a.score) for a in await asyncio.to_thread(run_pipeline, reloaded)] == [
        (a.data, a.score) for a in answers
    ]


async def test_scores_and_spans_are_haystacks_extractive_readers(tiny_distilbert_dir: Path) -> None:
    # Haystack's reader on the same weights: token spans (no word alignment) of any length, its default ranking.
    # DistilBERT: Haystack's reader sends no token_type_ids, which BERT would read as all zeros.
    reference = TransformersExtractiveReader(model=str(tiny_distilbert_dir), top_k=6, token=None)
    server, port = create_server(tiny_settings(tiny_distilbert_dir), registry=CollectorRegistry())
    await server.start()
    ours = QAServeReader(f"127.0.0.1:{port}", top_k=6, align_to_words=False, max_answer_length=384)

    # (Haystack's reader fails on a document without content among others: its query list is not filtered.)
    documents = [doc for doc in DOCUMENTS if doc.content]
    expected = await asyncio.to_thread(reference.run, query=SEED_QUESTION, documents=documents)
    try:
        got = await asyncio.to_thread(ours.run, query=SEED_QUESTION, documents=documents)
    finally:
        ours.close()
        await server.stop()

    def spans(answers: list[ExtractedAnswer]) -> list[tuple[str | None, str | None, int | None]]:
        return [
            (a.data, a.document.id if a.document else None, a.document_offset.start if a.document_offset else None)
            for a in answers
        ]

    assert spans(got["answers"]) == spans(expected["answers"])
    assert [a.score for a in got["answers"]] == pytest.approx([a.score for a in expected["answers"]], rel=1e-4)
