"""`qaserve export` as a user runs it: a servable ONNX directory, served over gRPC, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

from qaserve.runtime.backends import MANIFEST_FILE, ONNX_FILE, choose_backend
from qaserve.runtime.spec import ModelSpec
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, in_process_server, tiny_settings


def qaserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qaserve.main", *args], capture_output=True, text=True, timeout=300, check=False
    )


async def test_exported_int8_directory_serves_over_grpc(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "tiny-int8"
    done = qaserve(
        "export", str(tiny_model_dir), str(out), "--quantize", "int8", "--squad-em", "1.5", "--squad-f1", "2.5"
    )
    assert done.returncode == 0, done.stderr
    assert "int8" in done.stdout
    names = {p.name for p in out.iterdir()}
    assert {ONNX_FILE, MANIFEST_FILE, "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "model.safetensors" not in names  # the export stands on its own
    assert [p.name for p in out.parent.iterdir()] == ["tiny-int8"]  # no staging directory left behind
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["quantization"] == "int8"
    assert manifest["squad_v1.1_dev"] == {"exact_match": 1.5, "f1": 2.5}
    assert manifest["opset"] == 17

    async with (
        in_process_server(tiny_settings(out)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        response = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=30)
    [best] = response.answers
    assert best.answer == SEED_CONTEXT[best.start : best.end]
    assert (response.model.dtype, response.model.device) == ("int8", "cpu")
    assert response.model.revision.startswith("sha256:")


def test_export_beside_the_checkpoint_keeps_its_files(tiny_distilbert_dir: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_distilbert_dir, tmp_path / "model"))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    done = qaserve("export", str(model), str(model))
    assert done.returncode == 0, done.stderr
    after = {p.name: p.read_bytes() for p in model.iterdir()}
    assert set(after) == set(before) | {ONNX_FILE, MANIFEST_FILE}
    assert all(after[name] == content for name, content in before.items())
    assert json.loads((model / MANIFEST_FILE).read_text())["inputs"] == ["input_ids", "attention_mask"]
    assert choose_backend(ModelSpec("m", str(model), device="cpu")) == "onnx"
    assert choose_backend(ModelSpec("m", str(model), backend="torch", device="cpu")) == "torch"

    done = qaserve("export", str(model), str(model), "--scores-only", "--squad-em", "60", "--squad-f1", "70.5")
    assert done.returncode == 0, done.stderr
    assert json.loads((model / MANIFEST_FILE).read_text())["squad_v1.1_dev"] == {"exact_match": 60.0, "f1": 70.5}


def test_missing_model_directory_is_one_line_and_no_output(tmp_path: Path) -> None:
    done = qaserve("export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert done.returncode == 1
    assert done.stderr.startswith("qaserve export: ") and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_flags_are_usage_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = qaserve("export", str(tiny_model_dir), str(tmp_path / "out"), "--quantize", "int4")
    assert done.returncode == 2 and "--quantize" in done.stderr
    done = qaserve("export", str(tiny_model_dir), str(tmp_path / "out"), "--squad-f1", "70")
    assert done.returncode == 2 and "--squad-em and --squad-f1 go together" in done.stderr
