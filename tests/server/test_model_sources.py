"""Models as users bring them: Optimum exports, hub ids from the Hugging Face cache (offline), ONNX files that are
not QA models, and checkpoints a server without torch cannot run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from qaserve.metrics import Metrics
from qaserve.qa import QARequest
from qaserve.runtime import ModelRegistry, build_engine
from qaserve.runtime.backends import MANIFEST_FILE, ONNX_FILE
from qaserve.runtime.backends.manifest import sha256_file
from qaserve.runtime.model import load_model
from qaserve.runtime.spec import ModelsConfig, ModelSpec
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import (
    SEED_CONTEXT,
    SEED_QUESTION,
    add_to_hub_cache,
    error_reason,
    export_like_optimum,
    free_port,
    in_process_server,
    start_qaserve,
    tiny_settings,
    wait_serving,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a hub commit, as the cache names snapshots


async def torch_answer(checkpoint: Path) -> tuple[str, int, int]:
    """The checkpoint's best answer to the seed question on the torch backend, in process: the reference."""
    from concurrent.futures import ThreadPoolExecutor

    spec = ModelSpec("torch", str(checkpoint), backend="torch", device="cpu", warmup=False)
    with ThreadPoolExecutor(2) as executor:
        engine = build_engine(ModelsConfig((spec,), "torch"), executor=executor)
        [best] = (await engine.answer(QARequest(SEED_QUESTION, SEED_CONTEXT))).answers
        await engine.registry.close()
    return best.answer, best.start, best.end


async def ask(port: int, model: str = "") -> pb.AnswerResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        request = pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model=model)
        response: pb.AnswerResponse = await stub.Answer(request, timeout=60)
        return response


async def serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, object]:
    port = free_port()
    process = await start_qaserve(
        "serve", *args, *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--drain-seconds", "0"),
        env=env,
    )  # fmt: skip
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel, process)
    return port, process


async def stop(process: object) -> None:
    assert hasattr(process, "terminate") and hasattr(process, "wait")
    process.terminate()
    await process.wait()


async def test_optimum_export_answers_through_qaserve_serve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An Optimum export (no qaserve manifest) serves on onnx with the checkpoint's own answers."""
    export = export_like_optimum(tiny_model_dir, tmp_path / "optimum")
    assert not (export / MANIFEST_FILE).exists()
    port, process = await serve("--model", str(export))
    try:
        response = await ask(port)
    finally:
        await stop(process)
    [best] = response.answers
    assert (best.answer, best.start, best.end) == await torch_answer(tiny_model_dir)
    assert response.model.dtype == "float32"
    assert response.model.revision == sha256_file(export / ONNX_FILE)


@pytest.mark.parametrize("cache_variable", ["HF_HOME", "HF_HUB_CACHE"])
async def test_hub_ids_answer_from_an_offline_hugging_face_cache(
    tiny_model_dir: Path, tmp_path: Path, cache_variable: str
) -> None:
    """Hub ids resolve as the Hugging Face stack resolves them: a checkpoint repo at a pinned commit (torch), a repo
    keeping onnx/model.onnx beside its checkpoint at its main branch (onnx), and one not in the cache (refused)."""
    hub = tmp_path / "hf" / "hub"
    add_to_hub_cache(hub, "acme/tiny-qa", tiny_model_dir, COMMIT)
    layout = export_like_optimum(tiny_model_dir, tmp_path / "layout", "onnx/model.onnx")
    add_to_hub_cache(hub, "acme/tiny-qa-onnx", layout, COMMIT)
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nname = "pinned"\nsource = "acme/tiny-qa"\nrevision = "' + COMMIT + '"\nbackend = "torch"\n\n'
        '[[models]]\nname = "onnx"\nsource = "acme/tiny-qa-onnx"\ndevice = "cpu"\n\n'
        '[[models]]\nname = "absent"\nsource = "acme/not-downloaded"\n'
    )
    env = {"HF_HUB_OFFLINE": "1", cache_variable: str(hub.parent if cache_variable == "HF_HOME" else hub)}
    port, process = await serve("--models-config", str(models), "--device", "cpu", env=env)
    try:
        expected = await torch_answer(tiny_model_dir)
        for name, dtype in (("pinned", "float32"), ("onnx", "float32")):
            response = await ask(port, name)
            [best] = response.answers
            assert (best.answer, best.start, best.end) == expected, name
            assert response.model.dtype == dtype
        onnx = await ask(port, "onnx")
        assert onnx.model.revision == sha256_file(layout / "onnx" / ONNX_FILE)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ask(port, "absent")
    finally:
        await stop(process)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "MODEL_LOAD_FAILED"
    assert "not in the Hugging Face cache" in (caught.value.details() or "")
    assert "HF_HUB_OFFLINE is set" in (caught.value.details() or "")


async def test_a_hub_model_is_resolved_once_per_load(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning its devices, estimating its bytes and loading it all read one snapshot: the hub (or its cache) is
    asked once per load, for a model loaded on first use and again after an unload."""
    import huggingface_hub

    asked: list[tuple[str, str | None]] = []

    def snapshot_download(repo_id: str, *, revision: str | None = None, **_: object) -> str:
        asked.append((repo_id, revision))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    spec = ModelSpec("hub", "acme/tiny-qa", revision=COMMIT, backend="torch", device="cpu", warmup=False)
    registry = ModelRegistry([spec], "hub", Metrics(CollectorRegistry()))
    try:
        await registry.get("hub")
        assert asked == [("acme/tiny-qa", COMMIT)]
        await registry.unload("hub")
        await registry.load("hub")
        assert asked == [("acme/tiny-qa", COMMIT)] * 2
    finally:
        await registry.close()


def test_an_int8_graph_without_manifest_reports_int8_and_its_hash(tiny_int8_dir: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(tiny_int8_dir, tmp_path / "int8"))
    (directory / MANIFEST_FILE).unlink()
    model = load_model(ModelSpec("int8", str(directory), device="cpu", warmup=False))
    try:
        assert (model.backend, model.dtype, model.revision) == ("onnx", "int8", sha256_file(directory / ONNX_FILE))
    finally:
        model.close()


async def test_an_onnx_file_that_is_no_qa_model_fails_naming_its_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A sequence-classification ONNX (outputs `logits`) fails to load with MODEL_LOAD_FAILED naming what it has."""
    import torch

    export = export_like_optimum(tiny_model_dir, tmp_path / "classifier")

    class Classifier(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids.float().mean(dim=1, keepdim=True)

    torch.onnx.export(
        Classifier(), (torch.ones((1, 8), dtype=torch.long),), str(export / ONNX_FILE),
        input_names=["input_ids"], output_names=["logits"], dynamo=False,
    )  # fmt: skip
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nname = "tiny"\nsource = "{tiny_model_dir}"\n\n'
                      f'[[models]]\nname = "classifier"\nsource = "{export}"\n')  # fmt: skip
    async with in_process_server(tiny_settings(tiny_model_dir, models_config=str(models))) as server:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ask(server.port, "classifier")
    assert error_reason(caught.value) == "MODEL_LOAD_FAILED"
    details = caught.value.details() or ""
    assert "not a question-answering model" in details and "['logits']" in details and "start_logits" in details


def test_without_torch_a_checkpoint_fails_saying_how_to_export(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as without the wheel: importing it fails
    monkeypatch.delitem(sys.modules, "qaserve.runtime.backends.torch", raising=False)
    with pytest.raises(ValueError, match=r"no torch to run the checkpoint") as caught:
        load_model(ModelSpec("checkpoint", str(tiny_model_dir), device="cpu"))
    assert "`qaserve export DIR OUT --quantize int8`, then serve OUT" in str(caught.value)


def test_pickled_weights_get_the_line_that_converts_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A checkpoint with pytorch_model.bin only is refused with a conversion command, which then makes it load."""
    import torch
    from safetensors.torch import load_file

    directory = tmp_path / "bin-only"
    shutil.copytree(tiny_model_dir, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_model_dir / "model.safetensors"), directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin") as caught:
        load_model(ModelSpec("bin", str(directory), backend="torch", device="cpu"))
    command = str(caught.value).split("python -c ", 1)[1].strip('"').replace("DIR", str(directory))
    done = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    model = load_model(ModelSpec("bin", str(directory), backend="torch", device="cpu", warmup=False))
    model.close()
