"""The backend contract: a backend written in the tests (keyword_backend) plugs in with one line of the BACKENDS
table, and the replica thread's lifecycle is the contract's, not the backend's."""

from __future__ import annotations

import importlib.metadata
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from keyword_backend import KEYWORD_FILE, KeywordReplica

from qaserve.config import ConfigError, Settings, load_models_config, settings_from
from qaserve.metrics import build_labels
from qaserve.qa import QARequest
from qaserve.runtime import build_engine
from qaserve.runtime.backends import BACKENDS, BackendEntry
from qaserve.runtime.model import load_model
from qaserve.runtime.spec import ModelSpec

from qaserve_testing import PATIENCE, SEED_CONTEXT, SEED_QUESTION


@pytest.fixture
def keyword_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test backend in the table, as its line would be (numpy standing in for its framework)."""
    monkeypatch.setitem(BACKENDS, "keyword", BackendEntry("keyword_backend", "numpy"))
    yield


def keyword_model(tiny_model_dir: Path, directory: Path, keyword: str) -> Path:
    shutil.copytree(tiny_model_dir, directory)
    (directory / KEYWORD_FILE).write_text(keyword, encoding="utf-8")
    return directory


def forward_threads(model: str) -> list[str]:
    """The replica threads of `model` still running a moment later (ReplicaThread names them
    forward-<model>-<device>-<i>)."""
    threads = [t for t in threading.enumerate() if t.name.startswith(f"forward-{model}-")]
    for thread in threads:
        thread.join(PATIENCE)
    return [t.name for t in threads if t.is_alive()]


async def test_a_backend_in_the_table_serves_models_that_name_it(
    keyword_backend: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    keyword_model(tiny_model_dir, tmp_path / "europe", "Europe")
    models_file = tmp_path / "models.toml"
    models_file.write_text('[[models]]\nname = "europe"\nsource = "europe"\nbackend = "keyword"\n', encoding="utf-8")
    models = load_models_config(models_file, Settings(device="cpu"))  # the settings' choices read the table

    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(models, executor=executor)
        try:
            result = await engine.answer(QARequest(SEED_QUESTION, SEED_CONTEXT))
            [best] = result.answers
            assert (best.answer, best.start, best.end) == ("Europe", 31, 37)
            assert result.model.revision == "keyword:Europe"
            info = engine.registry.info("europe")
            assert (info.state.value, info.devices) == ("ready", ("cpu",))
        finally:
            await engine.registry.close()
    assert forward_threads("europe") == []


def test_the_settings_and_the_build_info_read_the_table(keyword_backend: None) -> None:
    assert settings_from({"backend": "keyword"}, {}).backend == "keyword"
    with pytest.raises(ConfigError) as refused:
        settings_from({"backend": "tpu"}, {})
    assert str(refused.value) == "--backend: 'tpu' is not allowed; expected one of auto, torch, onnx, keyword"
    assert build_labels()["numpy"] == importlib.metadata.version("numpy")
    assert build_labels()["onnxruntime"] == importlib.metadata.version("onnxruntime")


def test_an_unknown_backend_is_refused_by_the_settings() -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from({}, {"QASERVE_BACKEND": "keyword"})
    assert str(refused.value) == "QASERVE_BACKEND: 'keyword' is not allowed; expected one of auto, torch, onnx"


def test_a_replica_opens_runs_and_releases_on_its_own_thread(
    keyword_backend: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = keyword_model(tiny_model_dir, tmp_path / "m", "capital")
    spec = ModelSpec("keyword-lifecycle", str(directory), backend="keyword", replicas_per_device=2)
    model = load_model(spec, intra_op_threads=3)
    replicas = [r for r in model.replicas if isinstance(r, KeywordReplica)]
    assert len(replicas) == 2 and all(r.opened and r.threads == 3 for r in replicas)
    model.close()

    for replica in replicas:
        # open, warm-up forward, release: all on the one thread named after the replica
        assert len(replica.thread_names) == 3
        assert all(name.startswith(f"forward-{replica.label}") for name in replica.thread_names)
        assert not replica.opened
    assert forward_threads("keyword-lifecycle") == []


def test_a_replica_that_fails_to_open_leaves_no_thread_behind(
    keyword_backend: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = keyword_model(tiny_model_dir, tmp_path / "m", "")
    with pytest.raises(ValueError, match=f"{KEYWORD_FILE} is empty"):
        load_model(ModelSpec("keyword-empty", str(directory), backend="keyword"))
    assert forward_threads("keyword-empty") == []
