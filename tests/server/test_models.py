"""ModelService, per-model health and the model cache through real stubs, on three tiny models (two fit)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qaserve.server import QAServer
from qaserve_client.v1 import model_service_pb2 as mpb
from qaserve_client.v1 import model_service_pb2_grpc as mpb_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import build_tiny_model, error_reason, eventually, in_process_server, tiny_settings

CONTEXT = "The river flows into the lake near the old mill."


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_distilbert_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / "third", "bert", seed=3)
    (root / "broken").mkdir()
    shutil.copy(tiny_model_dir / "config.json", root / "broken" / "config.json")  # no weights, no tokenizer
    (root / "models.toml").write_text(
        f"""
default = "main"
max_models = 2

[[models]]
name = "main"
source = "{tiny_model_dir}"
pinned = true
preload = true

[[models]]
name = "second"
source = "{tiny_distilbert_dir}"

[[models]]
name = "third"
source = "third"

[[models]]
name = "broken"
source = "broken"
"""
    )
    return root


@pytest.fixture(scope="module")
async def server(models_dir: Path, tiny_model_dir: Path) -> AsyncIterator[tuple[QAServer, grpc.aio.Channel]]:
    settings = tiny_settings(tiny_model_dir, models_config=str(models_dir / "models.toml"))
    async with (
        in_process_server(settings) as qa_server,
        grpc.aio.insecure_channel(f"127.0.0.1:{qa_server.port}") as channel,
    ):
        yield qa_server, channel


async def states(channel: grpc.aio.Channel) -> dict[str, int]:
    reply = await mpb_grpc.ModelServiceStub(channel).ListModels(mpb.ListModelsRequest(), timeout=10)
    return {m.name: m.state for m in reply.models}


async def model_health(channel: grpc.aio.Channel, name: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=f"qaserve.model.{name}"), timeout=5
    )
    return reply.status


async def has_health(channel: grpc.aio.Channel, name: str, status: int) -> bool:
    return await model_health(channel, name) == status


async def test_models_load_on_use_evict_by_recency_and_report_health(
    server: tuple[QAServer, grpc.aio.Channel],
) -> None:
    _, channel = server
    models = mpb_grpc.ModelServiceStub(channel)
    qa = pb_grpc.QuestionAnsweringServiceStub(channel)
    assert await states(channel) == {
        "main": mpb.MODEL_STATE_READY,
        "second": mpb.MODEL_STATE_UNLOADED,
        "third": mpb.MODEL_STATE_UNLOADED,
        "broken": mpb.MODEL_STATE_UNLOADED,
    }
    assert await model_health(channel, "main") == health_pb2.HealthCheckResponse.SERVING
    assert await model_health(channel, "second") == health_pb2.HealthCheckResponse.NOT_SERVING

    reply = await qa.Answer(pb.AnswerRequest(question="Where?", context=CONTEXT, model="second"), timeout=30)
    assert reply.model.name == "second"
    await eventually(lambda: has_health(channel, "second", health_pb2.HealthCheckResponse.SERVING), "SERVING")

    loaded = await models.LoadModel(mpb.LoadModelRequest(name="third"), timeout=30)
    assert loaded.model.state == mpb.MODEL_STATE_READY and loaded.model.bytes > 0
    assert loaded.model.revision.startswith("sha256:")
    # capacity two with "main" pinned: "second" made room
    assert (await states(channel))["second"] == mpb.MODEL_STATE_UNLOADED
    await eventually(lambda: has_health(channel, "second", health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING")

    got = await models.GetModel(mpb.GetModelRequest(name="main"), timeout=10)
    assert got.model.is_default and got.model.pinned and got.model.HasField("last_used_time")

    unloaded = await models.UnloadModel(mpb.UnloadModelRequest(name="third"), timeout=30)
    assert unloaded.model.state == mpb.MODEL_STATE_UNLOADED


async def test_pinned_model_refuses_unload(server: tuple[QAServer, grpc.aio.Channel]) -> None:
    _, channel = server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mpb_grpc.ModelServiceStub(channel).UnloadModel(mpb.UnloadModelRequest(name="main"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "MODEL_PINNED"


@pytest.mark.parametrize("name", ["nope", "../main", "/tmp", "bert-base-uncased"])
async def test_unconfigured_names_are_not_found(server: tuple[QAServer, grpc.aio.Channel], name: str) -> None:
    _, channel = server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mpb_grpc.ModelServiceStub(channel).LoadModel(mpb.LoadModelRequest(name=name), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_broken_model_fails_alone_and_is_retried(
    server: tuple[QAServer, grpc.aio.Channel], models_dir: Path, tiny_model_dir: Path
) -> None:
    _, channel = server
    qa = pb_grpc.QuestionAnsweringServiceStub(channel)
    models = mpb_grpc.ModelServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await qa.Answer(pb.AnswerRequest(question="Where?", context=CONTEXT, model="broken"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "MODEL_LOAD_FAILED"
    assert str(models_dir) not in (caught.value.details() or "")

    info = (await models.GetModel(mpb.GetModelRequest(name="broken"), timeout=10)).model
    assert info.state == mpb.MODEL_STATE_FAILED and info.error
    assert (await qa.Answer(pb.AnswerRequest(question="Where?", context=CONTEXT), timeout=30)).answers

    # repair it, then retry through LoadModel
    await asyncio.to_thread(shutil.copytree, tiny_model_dir, models_dir / "broken", dirs_exist_ok=True)
    retried = await models.LoadModel(mpb.LoadModelRequest(name="broken"), timeout=30)
    assert retried.model.state == mpb.MODEL_STATE_READY
    reply = await qa.Answer(pb.AnswerRequest(question="Where?", context=CONTEXT, model="broken"), timeout=30)
    assert reply.model.name == "broken"


async def test_cli_models_list(server: tuple[QAServer, grpc.aio.Channel]) -> None:
    qa_server, _ = server
    cli = Path(sys.executable).with_name("qaserve-client")
    proc = await asyncio.create_subprocess_exec(
        str(cli), "--target", f"127.0.0.1:{qa_server.port}", "models", "list", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed["main"]["state"] == "ready" and listed["main"]["is_default"] is True
    assert set(listed) == {"main", "second", "third", "broken"}
