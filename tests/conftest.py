"""Shared fixtures: tiny random-weight QA models (and their ONNX exports) and an in-process server on one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qaserve.config import EMBEDDED_MODEL
from qaserve.server import QAServer

from qaserve_testing import build_tiny_model, export_tiny_onnx, free_port, in_process_server, tiny_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-distilbert"), "distilbert", seed=1)


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT (with token_type_ids) exported to ONNX, float32: tokenizer, config, model.onnx, manifest."""
    return export_tiny_onnx(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "tiny-bert-onnx")


@pytest.fixture(scope="session")
def tiny_distilbert_onnx_dir(tiny_distilbert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DistilBERT (no token_type_ids) exported to ONNX, float32."""
    return export_tiny_onnx(tiny_distilbert_dir, tmp_path_factory.mktemp("onnx") / "tiny-distilbert-onnx")


@pytest.fixture(scope="session")
def tiny_int8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT exported to ONNX with dynamic int8 weights."""
    return export_tiny_onnx(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "tiny-bert-int8", quantize="int8")


@pytest.fixture(scope="session")
async def tiny_server(tiny_model_dir: Path) -> AsyncIterator[tuple[QAServer, str]]:
    """A real grpc.aio qaserve on the tiny model, with a fresh metrics registry; yields (server, target)."""
    async with in_process_server(tiny_settings(tiny_model_dir)) as server:
        yield server, f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
async def embedded_server() -> AsyncIterator[tuple[QAServer, str, str]]:
    """The embedded model (it answers "Paris" to the seed question) with HTTP on, no response cache and small
    batches (a long context gives partial answers); yields (server, HTTP base URL, gRPC target)."""
    settings = tiny_settings(
        EMBEDDED_MODEL, model_name="", http_port=free_port(), response_cache_bytes=0, max_batch_windows=4
    )
    async with in_process_server(settings) as server:
        yield server, f"http://127.0.0.1:{server.http_port}", f"127.0.0.1:{server.port}"
