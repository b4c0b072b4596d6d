"""Per-model keys of the models file and its reload (SIGHUP), through real gRPC calls and the `qaserve` process."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qaserve.qa import QAParams
from qaserve.qa.windowing import resolve_params
from qaserve.runtime.model import load_model
from qaserve.runtime.spec import ModelSpec
from qaserve.server import QAServer
from qaserve_client.v1 import model_service_pb2 as mpb
from qaserve_client.v1 import model_service_pb2_grpc as mpb_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import (
    SEED_CONTEXT,
    SEED_QUESTION,
    free_port,
    in_process_server,
    start_qaserve,
    tiny_settings,
    wait_serving,
)

NO_RETRIES = [("grpc.enable_retries", 0)]
SERVING = health_pb2.HealthCheckResponse.SERVING
PATIENCE = 60.0  # seconds a condition may take on a busy 2-core machine before the test gives up


def models_file(path: Path, *models: str, default: str = "main") -> Path:
    path.write_text(f'default = "{default}"\n' + "".join(models))
    return path


def model(name: str, source: Path, **keys: object) -> str:
    lines = [f'name = "{name}"', f'source = "{source}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n[[models]]\n" + "\n".join(lines) + "\n"


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    metadata = dict(error.trailing_metadata() or ())
    return status_pb2.Status.FromString(metadata["grpc-status-details-bin"])


@pytest.fixture
async def two_models(
    tmp_path: Path, tiny_model_dir: Path, tiny_distilbert_dir: Path
) -> AsyncIterator[tuple[QAServer, str, Path]]:
    """An in-process server on `main` (top_k 3 and at most one request in flight by default) and `other`."""
    path = models_file(
        tmp_path / "models.toml",
        model("main", tiny_model_dir, preload=True, top_k=3, max_in_flight=1, max_batch_windows=2),
        model("other", tiny_distilbert_dir, preload=True),
    )
    async with in_process_server(tiny_settings(tiny_model_dir, models_config=str(path))) as server:
        yield server, f"127.0.0.1:{server.port}", path


async def test_model_defaults_apply_to_requests_that_leave_them_unset(
    two_models: tuple[QAServer, str, Path],
) -> None:
    server, target, _ = two_models
    async with grpc.aio.insecure_channel(target, options=NO_RETRIES) as channel:
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        unset = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model="main"))
        explicit = await stub.Answer(
            pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model="main", top_k=1)
        )
        elsewhere = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model="other"))
    assert len(unset.answers) == 3  # the model's top_k
    assert len(explicit.answers) == 1  # the request's own value wins, even when it equals the pipeline's default
    assert len(elsewhere.answers) == 1  # other models keep the pipeline's
    assert server.engine.registry.loaded("main").batcher.limits.max_windows == 2  # type: ignore[union-attr]
    assert server.engine.registry.loaded("other").batcher.limits.max_windows == 32  # type: ignore[union-attr]


def test_defaults_resolve_request_then_model_then_pipeline() -> None:
    model = QAParams(top_k=3, max_answer_len=30, max_seq_len=256, doc_stride=100)

    assert resolve_params(QAParams(), 512, model) == QAParams(
        top_k=3, max_answer_len=30, max_seq_len=256, doc_stride=100
    )
    assert resolve_params(QAParams(top_k=1, max_seq_len=128), 512, model) == QAParams(
        top_k=1, max_answer_len=30, max_seq_len=128, doc_stride=100
    )
    # A default stride that does not fit a request's shorter windows gives way to the pipeline's rule.
    assert resolve_params(QAParams(max_seq_len=64), 512, model).doc_stride is None
    assert resolve_params(QAParams(), 200, model).max_seq_len == 200  # never past the model's limit
    assert resolve_params(QAParams(), 512) == QAParams(top_k=1, max_answer_len=15, max_seq_len=384)


def test_a_default_max_seq_len_past_the_models_limit_fails_its_load(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_seq_len 4096 is longer than this model's limit of 512 tokens"):
        load_model(ModelSpec("long", str(tiny_model_dir), device="cpu", max_seq_len=4096))


async def test_a_models_in_flight_bound_refuses_its_excess_while_other_models_serve(
    two_models: tuple[QAServer, str, Path],
) -> None:
    server, target, _ = two_models
    serving = server.engine.registry.loaded("main")
    assert serving is not None
    gate = threading.Event()
    # Occupies main's replica threads, so main's first request stays in flight until the gate opens.
    blockers = [replica.executor.submit(gate.wait, PATIENCE) for replica in serving.model.replicas]
    try:
        async with grpc.aio.insecure_channel(target, options=NO_RETRIES) as channel:
            stub = pb_grpc.QuestionAnsweringServiceStub(channel)
            first = asyncio.ensure_future(
                stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model="main"))
            )
            for _ in range(int(PATIENCE / 0.01)):
                if server.engine.in_flight == 1:
                    break
                await asyncio.sleep(0.01)
            assert server.engine.in_flight == 1

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Answer(pb.AnswerRequest(question="Which country?", context=SEED_CONTEXT, model="main"))
            other = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model="other"))

            gate.set()
            answered = await first
    finally:
        gate.set()
        for blocker in blockers:
            blocker.result(PATIENCE)

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model 'main' is at its limit of 1" in (refused.value.details() or "")
    details = {d.TypeName(): d for d in rich_status(refused.value).details}
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert details["google.rpc.ErrorInfo"].Unpack(info) and info.reason == "OVERLOADED"
    assert details["google.rpc.RetryInfo"].Unpack(retry) and retry.retry_delay.ToNanoseconds() > 0
    assert other.model.name == "other"
    assert answered.model.name == "main" and len(answered.answers) == 3


async def test_a_bad_file_on_reload_keeps_the_current_models(
    two_models: tuple[QAServer, str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, target, path = two_models
    path.write_text(path.read_text() + 'pinned = "no"\n')

    with caplog.at_level(logging.INFO, logger="qaserve"):
        assert await server.reload_models() is None

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("reload: keeping the current models: ")
    assert "pinned" in errors[0]
    assert list(server.engine.registry.specs) == ["main", "other"]
    async with grpc.aio.insecure_channel(target, options=NO_RETRIES) as channel:
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        reply = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT))
    assert reply.model.name == "main" and len(reply.answers) == 3


async def test_reload_removes_a_model_and_its_health_name(two_models: tuple[QAServer, str, Path]) -> None:
    server, target, path = two_models
    tiny = server.engine.registry.spec("main").source
    models_file(path, model("main", Path(tiny), preload=True, top_k=3, max_in_flight=1, max_batch_windows=2))

    changes = await server.reload_models()

    assert changes is not None and changes.removed == ("other",) and not changes.reloaded
    await server.engine.registry.retired()
    async with grpc.aio.insecure_channel(target, options=NO_RETRIES) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="qaserve.model.other"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        listed = await mpb_grpc.ModelServiceStub(channel).ListModels(mpb.ListModelsRequest())
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model="other"))
    assert [m.name for m in listed.models] == ["main"]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_without_a_models_file_reload_has_nothing_to_do(
    tiny_server: tuple[QAServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = tiny_server
    with caplog.at_level(logging.INFO, logger="qaserve"):
        assert await server.reload_models() is None
    assert any("nothing to reload" in r.getMessage() for r in caplog.records)
    assert list(server.engine.registry.specs) == ["tiny"]


# -- SIGHUP on the real process ---------------------------------------------------------------------------------


async def test_sighup_under_traffic_adds_and_reloads_models_without_a_failed_request(
    tmp_path: Path, tiny_model_dir: Path, tiny_distilbert_dir: Path
) -> None:
    path = models_file(tmp_path / "models.toml", model("main", tiny_model_dir, preload=True))
    port = free_port()
    process = await start_qaserve(
        "serve",
        *("--models-config", str(path), "--device", "cpu", "--intra-op-threads", "1"),
        *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
        *("--drain-seconds", "0", "--log-format", "json"),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_RETRIES) as channel:
            await wait_serving(channel, process)
            stub = pb_grpc.QuestionAnsweringServiceStub(channel)
            seed = pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT)
            assert len((await stub.Answer(seed)).answers) == 1  # (and now in the response cache)

            failures: list[str] = []
            answered = [0]
            stop = asyncio.Event()

            async def traffic(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    context = f"{SEED_CONTEXT} Request {worker}-{i} asks again."  # no cache hits: real forwards
                    try:
                        await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=context), timeout=30)
                        answered[0] += 1
                    except grpc.aio.AioRpcError as error:
                        failures.append(f"{error.code().name}: {error.details()}")

            workers = [asyncio.create_task(traffic(w)) for w in range(3)]
            await until(lambda: answered[0] >= 10, process)
            models_file(
                path,
                model("main", tiny_model_dir, preload=True, top_k=3),
                model("second", tiny_distilbert_dir, preload=True),
            )
            process.send_signal(signal.SIGHUP)

            models = mpb_grpc.ModelServiceStub(channel)
            for _ in range(int(PATIENCE / 0.1)):
                listed = await models.ListModels(mpb.ListModelsRequest())
                ready = {m.name for m in listed.models if m.state == mpb.MODEL_STATE_READY}
                if ready == {"main", "second"} and len((await stub.Answer(seed)).answers) == 3:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the reload did not take effect: {listed}")
            during = answered[0]
            await until(lambda: answered[0] >= during + 10, process)  # traffic goes on after the swap
            stop.set()
            await asyncio.gather(*workers)

            second = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT, model="second"))
            assert second.model.name == "second"
            assert [m.name for m in listed.models] == ["main", "second"]
            assert failures == []
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), PATIENCE) == 0
        assert process.stderr is not None
        log = [json.loads(line) for line in (await process.stderr.read()).decode().splitlines() if line.startswith("{")]
        messages = [entry["message"] for entry in log]
        assert any(m.endswith("added second; reloaded main") for m in messages if m.startswith("reload of ")), messages
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def until(condition: Callable[[], bool], process: asyncio.subprocess.Process) -> None:
    for _ in range(int(PATIENCE / 0.05)):
        if condition():
            return
        assert process.returncode is None, f"the server exited with {process.returncode}"
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")
