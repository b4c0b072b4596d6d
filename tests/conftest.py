"""Shared fixtures: tiny random-weight QA models and an in-process server on one of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from qaserve.server import QAServer, create_server

from qaserve_testing import build_tiny_model, tiny_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-distilbert"), "distilbert", seed=1)


@pytest.fixture(scope="session")
async def tiny_server(tiny_model_dir: Path) -> AsyncIterator[tuple[QAServer, str]]:
    """A real grpc.aio qaserve on the tiny model, with a fresh metrics registry; yields (server, target)."""
    server, port = create_server(tiny_settings(tiny_model_dir), registry=CollectorRegistry())
    await server.start()
    yield server, f"127.0.0.1:{port}"
    await server.stop()
