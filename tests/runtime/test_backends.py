"""The torch and onnx backends on tiny models: same answers, what they report, how auto chooses, load errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from qaserve.qa import QAParams, decode_answers
from qaserve.runtime.backends import (
    MANIFEST_FILE,
    ONNX_FILE,
    WindowLogits,
    choose_backend,
    estimate_bytes,
    plan_devices,
)
from qaserve.runtime.backends.manifest import sha256_file
from qaserve.runtime.device import cpu_cores
from qaserve.runtime.model import ModelLoader, QAModel, load_model
from qaserve.runtime.spec import ModelSpec

QUESTION = "Where does the river flow?"
CONTEXT = "The river flows into the lake near the old mill. The mill was built in 1820 by the miller's family."


def forward(model: QAModel, question: str = QUESTION, context: str = CONTEXT) -> tuple[list[WindowLogits], QAParams]:
    params = model.resolve(QAParams(top_k=3, max_seq_len=32, doc_stride=8))
    windows = model.split(question, context, params)
    replica = model.replicas[0]
    return replica.executor.submit(replica.forward, QAModel.inputs(windows)).result(), params


def stack(outputs: list[WindowLogits]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(o.start) for o in outputs)
    start = np.zeros((len(outputs), width), dtype=np.float32)
    end = np.zeros((len(outputs), width), dtype=np.float32)
    for row, o in enumerate(outputs):
        start[row, : len(o.start)] = o.start
        end[row, : len(o.end)] = o.end
    return start, end


@pytest.mark.parametrize(
    ("torch_dir", "onnx_dir"),
    [("tiny_model_dir", "tiny_onnx_dir"), ("tiny_distilbert_dir", "tiny_distilbert_onnx_dir")],
)
def test_torch_and_onnx_give_the_same_answers(torch_dir: str, onnx_dir: str, request: pytest.FixtureRequest) -> None:
    torch_model = load_model(ModelSpec("t", str(request.getfixturevalue(torch_dir)), backend="torch", device="cpu"))
    onnx_model = load_model(ModelSpec("o", str(request.getfixturevalue(onnx_dir)), device="cpu"))
    try:
        assert (torch_model.backend, onnx_model.backend) == ("torch", "onnx")
        by_torch, params = forward(torch_model)
        by_onnx, _ = forward(onnx_model)
        assert len(by_torch) == len(by_onnx) > 1  # several windows, each trimmed to its own length
        for a, b in zip(by_torch, by_onnx, strict=True):
            assert a.start.dtype == b.start.dtype == np.float32
            assert a.start.shape == b.start.shape
            np.testing.assert_allclose(a.start, b.start, atol=1e-4)
            np.testing.assert_allclose(a.end, b.end, atol=1e-4)
        windows = torch_model.split(QUESTION, CONTEXT, params)
        [best_torch] = decode_answers(CONTEXT, windows, *stack(by_torch), torch_model.resolve(QAParams(max_seq_len=32)))
        [best_onnx] = decode_answers(CONTEXT, windows, *stack(by_onnx), onnx_model.resolve(QAParams(max_seq_len=32)))
        assert (best_onnx.answer, best_onnx.start, best_onnx.end) == (
            best_torch.answer,
            best_torch.start,
            best_torch.end,
        )
        assert best_onnx.score == pytest.approx(best_torch.score, rel=1e-3)
    finally:
        torch_model.close()
        onnx_model.close()


def test_onnx_model_reports_dtype_revision_bytes_and_runs_on_its_own_thread(tiny_int8_dir: Path) -> None:
    spec = ModelSpec("int8", str(tiny_int8_dir), device="cpu", replicas_per_device=2)
    model = load_model(spec, intra_op_threads=1, tokenize_threads=3)
    try:
        assert model.backend == "onnx"
        assert model.dtype == "int8"
        assert model.devices == ["cpu"]
        assert model.revision == sha256_file(tiny_int8_dir / ONNX_FILE)
        assert model.nbytes == 2 * (tiny_int8_dir / ONNX_FILE).stat().st_size == estimate_bytes(spec)
        assert model.max_seq_len == 512
        assert sorted(r.label for r in model.replicas) == ["int8-cpu-0", "int8-cpu-1"]
        assert all(r.session.get_session_options().intra_op_num_threads == 1 for r in model.replicas)
        assert model._splitters.qsize() == 3  # one splitter (a tokenizer copy) per tokenizing thread
        seen: list[str] = []
        for replica in model.replicas:
            seen.append(replica.executor.submit(lambda: threading.current_thread().name).result())
            outputs, params = forward(model)
            assert all(np.isfinite(o.start).all() for o in outputs)
        assert len(set(seen)) == 2 and all(name.startswith("forward-int8-cpu-") for name in seen)
        for a in decode_answers(CONTEXT, model.split(QUESTION, CONTEXT, params), *stack(outputs), params):
            assert a.answer == CONTEXT[a.start : a.end]
    finally:
        model.close()
    assert model.replicas == []


@pytest.mark.parametrize(("intra_op_threads", "replicas"), [(0, 5), (1, 4), (2, 2)])
def test_onnx_bytes_planned_are_the_bytes_its_replicas_load(
    tiny_int8_dir: Path, monkeypatch: pytest.MonkeyPatch, intra_op_threads: int, replicas: int
) -> None:
    """What the model cache reserves before a load is what the load takes, with --intra-op-threads set or not: on
    4 cores, 4 one-thread lanes and a solo replica by the policy, 4 replicas of 1 thread, or 2 of 2."""
    monkeypatch.setattr("qaserve.runtime.policy.cpu_cores", lambda: 4)
    loader = ModelLoader(intra_op_threads=intra_op_threads)
    plan = loader.plan(ModelSpec("int8", str(tiny_int8_dir), device="cpu", warmup=False))
    model = loader.load(plan.spec)
    try:
        assert len(model.replicas) == replicas
        assert plan.nbytes == model.nbytes == replicas * (tiny_int8_dir / ONNX_FILE).stat().st_size
    finally:
        model.close()


def test_int8_weights_are_smaller_than_float32(tiny_onnx_dir: Path, tiny_int8_dir: Path) -> None:
    assert (tiny_int8_dir / ONNX_FILE).stat().st_size < (tiny_onnx_dir / ONNX_FILE).stat().st_size
    manifest = json.loads((tiny_int8_dir / MANIFEST_FILE).read_text())
    assert manifest["quantization"] == "int8" and manifest["format_version"] == 1
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]


def test_distilbert_export_has_no_token_type_ids(tiny_distilbert_onnx_dir: Path) -> None:
    manifest = json.loads((tiny_distilbert_onnx_dir / MANIFEST_FILE).read_text())
    assert manifest["inputs"] == ["input_ids", "attention_mask"]


def test_auto_picks_onnx_on_cpu_where_model_onnx_exists(tiny_model_dir: Path, tiny_onnx_dir: Path) -> None:
    assert choose_backend(ModelSpec("m", str(tiny_onnx_dir), device="cpu")) == "onnx"
    assert choose_backend(ModelSpec("m", str(tiny_model_dir), device="cpu")) == "torch"
    assert choose_backend(ModelSpec("m", str(tiny_onnx_dir), backend="torch", device="cpu")) == "torch"
    assert choose_backend(ModelSpec("m", str(tiny_onnx_dir), device="cuda")) == "torch"
    assert choose_backend(ModelSpec("m", str(tiny_model_dir), backend="onnx")) == "onnx"
    assert plan_devices(ModelSpec("m", str(tiny_onnx_dir), device="cpu")) == ["cpu"]
    with pytest.raises(ValueError, match="backend must be one of auto, torch, onnx"):
        choose_backend(ModelSpec("m", str(tiny_onnx_dir), backend="tensorrt"))


def test_torch_backend_reports_float32_and_the_weights_hash(tiny_model_dir: Path) -> None:
    model = load_model(ModelSpec("t", str(tiny_model_dir), device="cpu"))
    try:
        assert (model.backend, model.dtype, model.devices) == ("torch", "float32", ["cpu"])
        assert model.revision == sha256_file(tiny_model_dir / "model.safetensors")
        # The estimate reads the safetensors header; the loaded model adds a few non-persistent buffers.
        assert model.nbytes == pytest.approx(
            estimate_bytes(ModelSpec("t", str(tiny_model_dir), device="cpu")), rel=0.01
        )
    finally:
        model.close()


def test_torch_loads_and_runs_only_on_replica_threads(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import transformers

    threads: list[str] = []
    original = transformers.AutoModelForQuestionAnswering.from_pretrained

    def recording(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForQuestionAnswering, "from_pretrained", recording)
    model = load_model(ModelSpec("t", str(tiny_model_dir), device="cpu", replicas_per_device=2), intra_op_threads=1)
    try:
        assert len(threads) == 1 and threads[0].startswith("forward-t-cpu-0")  # loaded once, on a replica's thread
        module = model.replicas[0].module
        assert module is model.replicas[1].module  # replicas on a device share weights
        module.register_forward_pre_hook(lambda *_: threads.append(threading.current_thread().name))
        for replica in model.replicas:
            assert replica.executor.submit(torch.get_num_threads).result() == 1
            replica.executor.submit(
                replica.forward, QAModel.inputs(model.split(QUESTION, CONTEXT, model.resolve(QAParams())))
            ).result()
        assert sorted(threads[1:]) == ["forward-t-cpu-0_0", "forward-t-cpu-1_0"]
    finally:
        model.close()


def test_by_default_a_cpu_model_runs_a_lane_per_core_and_a_solo_replica_with_every_core(
    tiny_model_dir: Path, tiny_int8_dir: Path
) -> None:
    import torch

    cores = cpu_cores()
    lanes = [f"cpu-{i}" for i in range(cores)]
    for directory in (tiny_int8_dir, tiny_model_dir):
        model = load_model(ModelSpec("m", str(directory), device="cpu"))
        try:
            by_label = {r.label.removeprefix("m-"): r for r in model.replicas}
            assert sorted(by_label) == sorted(lanes + (["cpu-solo"] if cores > 1 else []))
            assert (model.solo is by_label.get("cpu-solo")) and (model.solo is None) == (cores == 1)
            for label, replica in by_label.items():
                want = cores if label == "cpu-solo" else 1
                if model.backend == "onnx":  # the session's own setting
                    assert replica.session.get_session_options().intra_op_num_threads == want
                else:  # torch's intra-op threads are per thread: asked on the replica's own
                    assert replica.executor.submit(torch.get_num_threads).result() == want
        finally:
            model.close()


@pytest.fixture
def onnx_copy(tiny_onnx_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_onnx_dir, tmp_path / "copy"))


def test_corrupt_onnx_file_is_a_clear_load_error(onnx_copy: Path) -> None:
    (onnx_copy / ONNX_FILE).write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"model\.onnx could not be read as an ONNX model"):
        load_model(ModelSpec("bad", str(onnx_copy), device="cpu"))


def test_onnx_backend_without_model_onnx_is_a_clear_load_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"needs an ONNX file \(model\.onnx or onnx/model\.onnx\)"):
        load_model(ModelSpec("bad", str(tiny_model_dir), backend="onnx", device="cpu"))


@pytest.mark.parametrize(("device", "dtype", "message"), [("mps", "auto", "cpu or cuda"), ("cpu", "float16", "dtype")])
def test_onnx_backend_refuses_devices_and_dtypes_it_cannot_run(
    tiny_onnx_dir: Path, device: str, dtype: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_model(ModelSpec("bad", str(tiny_onnx_dir), backend="onnx", device=device, dtype=dtype))


def test_the_runtime_and_qa_core_import_no_framework() -> None:
    code = (
        "import sys\n"
        "import qaserve.qa, qaserve.runtime, qaserve.runtime.backends, qaserve.runtime.engine, qaserve.main\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnxruntime', 'onnx'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
