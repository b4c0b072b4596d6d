"""TLS, mutual TLS, bearer tokens and message size limits, on real servers and clients over loopback."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qaserve.api.auth import BearerTokens
from qaserve.config import Settings, parse_settings
from qaserve.server import QAServer
from qaserve_client import AsyncQAClient, ManyItem, QAClient, QAServeError, tls_credentials
from qaserve_client.v1 import model_service_pb2, model_service_pb2_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import (
    SEED_CONTEXT,
    SEED_QUESTION,
    Authority,
    Pki,
    free_port,
    in_process_server,
    make_pki,
    tiny_settings,
)

CLI = str(Path(sys.executable).with_name("qaserve-client"))

# ---------------------------------------------------------------------------------------------------------------
# Certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------------------------------------------
# Servers


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[QAServer, str]]:
    async with in_process_server(settings) as server:
        yield server, f"127.0.0.1:{server.port}"


async def ask(client: AsyncQAClient) -> str:
    result = await client.answer(SEED_QUESTION, SEED_CONTEXT)
    return result.model.name


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status details on the error")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for packed in rich_status(error).details:
        info = error_details_pb2.ErrorInfo()
        if packed.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


# ---------------------------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
async def tls_server(tiny_model_dir: Path, pki: Pki) -> AsyncIterator[tuple[QAServer, str]]:
    settings = tiny_settings(
        tiny_model_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), health_port=free_port()
    )
    async with serving(settings) as running:
        yield running


async def test_tls_client_with_the_ca_is_served(tls_server: tuple[QAServer, str], pki: Pki) -> None:
    async with AsyncQAClient(tls_server[1], credentials=tls_credentials(pki.ca), timeout=5) as client:
        assert await ask(client) == "tiny"
        assert await client.health() == "SERVING"


@pytest.mark.parametrize("ca", ["system", "other", "plaintext"])
async def test_tls_client_without_the_ca_is_refused(tls_server: tuple[QAServer, str], pki: Pki, ca: str) -> None:
    credentials = {"system": tls_credentials(), "other": tls_credentials(pki.other_ca), "plaintext": None}[ca]
    async with AsyncQAClient(tls_server[1], credentials=credentials, timeout=3) as client:
        with pytest.raises(QAServeError) as caught:
            await client.health()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_sync_client_and_cli_over_tls(tls_server: tuple[QAServer, str], pki: Pki) -> None:
    def blocking() -> str:
        with QAClient(tls_server[1], credentials=tls_credentials(ca_file=pki.ca), timeout=5) as client:
            return client.answer(SEED_QUESTION, SEED_CONTEXT).model.name

    assert await asyncio.to_thread(blocking) == "tiny"
    cli = [CLI, "--target", tls_server[1]]
    ok = await run(*cli, "--ca-file", str(pki.ca), "health")
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    refused = await run(*cli, "--tls", "--timeout", "3", "health")
    assert refused.returncode == 64 + 14  # UNAVAILABLE: the handshake fails


async def test_health_port_stays_plaintext_for_probes(tls_server: tuple[QAServer, str]) -> None:
    server = tls_server[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # health only: no way around TLS
            await pb_grpc.QuestionAnsweringServiceStub(channel).Answer(
                pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=5
            )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_rotated_server_certificate_is_used_by_new_connections(tiny_model_dir: Path, tmp_path: Path) -> None:
    first, second = Authority("first"), Authority("second")
    cert, key = first.issue(tmp_path, "server", server=True)
    settings = tiny_settings(tiny_model_dir, tls_cert=str(cert), tls_key=str(key))
    async with serving(settings) as (_, target):
        async with AsyncQAClient(target, credentials=tls_credentials(first.write(tmp_path / "1.crt"))) as client:
            assert await client.health() == "SERVING"
        second.issue(tmp_path, "server", server=True)  # same paths, as a renewed Kubernetes secret
        async with AsyncQAClient(target, credentials=tls_credentials(second.write(tmp_path / "2.crt"))) as client:
            assert await client.health() == "SERVING"


# ---------------------------------------------------------------------------------------------------------------
# Mutual TLS


@pytest.fixture(scope="module")
async def mtls_server(tiny_model_dir: Path, pki: Pki) -> AsyncIterator[tuple[QAServer, str]]:
    settings = tiny_settings(
        tiny_model_dir,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )
    async with serving(settings) as running:
        yield running


async def test_mutual_tls_client_with_a_certificate_is_served(mtls_server: tuple[QAServer, str], pki: Pki) -> None:
    credentials = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    async with AsyncQAClient(mtls_server[1], credentials=credentials, timeout=5) as client:
        assert await ask(client) == "tiny"


@pytest.mark.parametrize("certificate", ["none", "stranger"])
async def test_mutual_tls_client_without_a_trusted_certificate_is_refused(
    mtls_server: tuple[QAServer, str], pki: Pki, certificate: str
) -> None:
    if certificate == "none":
        credentials = tls_credentials(pki.ca)
    else:
        credentials = tls_credentials(pki.ca, pki.stranger_cert, pki.stranger_key)
    async with AsyncQAClient(mtls_server[1], credentials=credentials, timeout=3) as client:
        with pytest.raises(QAServeError) as caught:
            await ask(client)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both"):
        tls_credentials(pki.ca, cert_file=pki.client_cert)


# ---------------------------------------------------------------------------------------------------------------
# Bearer tokens

TOKENS = ("alpha-token", "beta-token")


@pytest.fixture(scope="module")
async def token_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[QAServer, str]]:
    token_file = tmp_path_factory.mktemp("auth") / "tokens"
    token_file.write_text(f"# rotated by the secret's owner\n{TOKENS[1]}\n")
    settings = tiny_settings(tiny_model_dir, auth_tokens=TOKENS[0], auth_tokens_file=str(token_file))
    async with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
async def token_channel(token_server: tuple[QAServer, str]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(token_server[1]) as channel:
        yield channel


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "MISSING_TOKEN"),
        ((("authorization", "Bearer wrong"),), "INVALID_TOKEN"),
        ((("authorization", f"Bearer {TOKENS[0]}x"),), "INVALID_TOKEN"),
        ((("authorization", f"Basic {TOKENS[0]}"),), "INVALID_TOKEN"),
    ],
    ids=["missing", "wrong", "longer", "not-bearer"],
)
async def test_answer_without_a_valid_token_is_unauthenticated(
    token_channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    stub = pb_grpc.QuestionAnsweringServiceStub(token_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), metadata=metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(caught.value)
    assert (info.reason, info.domain) == (reason, "qaserve")
    # Health and reflection stay reachable without a token.
    health = await health_pb2_grpc.HealthStub(token_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_rpc_shape_needs_the_token_but_reflection(token_channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.QuestionAnsweringServiceStub(token_channel)
    request = pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT)
    calls = {
        "AnswerProgressive": lambda: _drain(stub.AnswerProgressive(pb.AnswerProgressiveRequest(request=request))),
        "AnswerMany": lambda: _drain(stub.AnswerMany(iter([pb.AnswerManyRequest(id="1", request=request)]))),
        "Read": lambda: stub.Read(pb.ReadRequest(question=SEED_QUESTION, passages=[pb.Passage(text=SEED_CONTEXT)])),
        "ListModels": lambda: model_service_pb2_grpc.ModelServiceStub(token_channel).ListModels(
            model_service_pb2.ListModelsRequest(), timeout=5
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    reflection = reflection_pb2_grpc.ServerReflectionStub(token_channel)
    list_services = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in reflection.ServerReflectionInfo(iter([list_services])):
        assert "qaserve.v1.QuestionAnsweringService" in {s.name for s in reply.list_services_response.service}


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def test_rejections_are_counted(token_server: tuple[QAServer, str], token_channel: grpc.aio.Channel) -> None:
    registry = token_server[0].metrics.registry
    before = registry.get_sample_value("qaserve_errors_total", {"reason": "MISSING_TOKEN"}) or 0.0
    with pytest.raises(grpc.aio.AioRpcError):
        await pb_grpc.QuestionAnsweringServiceStub(token_channel).Answer(pb.AnswerRequest(), timeout=5)
    assert registry.get_sample_value("qaserve_errors_total", {"reason": "MISSING_TOKEN"}) == before + 1


async def test_async_client_with_a_token_uses_every_rpc_shape(token_server: tuple[QAServer, str]) -> None:
    # Plaintext: the token goes as metadata through the client's interceptor (gRPC sends call credentials over
    # TLS only); the file's token works as well as the environment's.
    for token in TOKENS:
        async with AsyncQAClient(token_server[1], token=token, timeout=10) as client:
            assert await ask(client) == "tiny"
            updates = [u async for u in client.answer_progressive(SEED_QUESTION, SEED_CONTEXT)]
            assert updates[-1].model.name == "tiny"  # type: ignore[union-attr]
            results = [r async for r in client.answer_many([ManyItem("a", SEED_QUESTION, SEED_CONTEXT)])]
            assert [(r.id, r.error) for r in results] == [("a", None)]
            assert [m.name for m in await client.list_models()] == ["tiny"]


async def test_sync_client_and_cli_with_a_token(token_server: tuple[QAServer, str], tmp_path: Path) -> None:
    def blocking() -> list[str | None]:
        with QAClient(token_server[1], token=TOKENS[0], timeout=10) as client:
            first = client.answer(SEED_QUESTION, SEED_CONTEXT).model.name
            many = [r.error for r in client.answer_many([ManyItem("a", SEED_QUESTION, SEED_CONTEXT)])]
            return [first, *[None if e is None else e.reason for e in many]]

    assert await asyncio.to_thread(blocking) == ["tiny", None]
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS[1] + "\n")
    cli = [CLI, "--target", token_server[1]]
    question = ["ask", "--question", SEED_QUESTION, "--context", SEED_CONTEXT, "--json"]
    ok = await run(*cli, "--token-file", str(token_file), *question)
    assert ok.returncode == 0, ok.stderr
    refused = await run(*cli, *question)
    assert refused.returncode == 64 + 16 and "UNAUTHENTICATED" in refused.stderr


async def test_token_over_tls_goes_as_call_credentials(tiny_model_dir: Path, pki: Pki) -> None:
    settings = tiny_settings(
        tiny_model_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), auth_tokens=",".join(TOKENS)
    )
    async with serving(settings) as (_, target):
        async with AsyncQAClient(target, credentials=tls_credentials(pki.ca), token=TOKENS[1]) as client:
            assert await ask(client) == "tiny"
        async with AsyncQAClient(target, credentials=tls_credentials(pki.ca)) as client:
            with pytest.raises(QAServeError) as caught:
                await ask(client)
            assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("one\n\n# comment\n  two  \n")
    now = [0.0]
    tokens = BearerTokens(file=path, recheck_seconds=1.0, clock=lambda: now[0])
    assert tokens.matches("one") and tokens.matches("two") and not tokens.matches("# comment")
    path.write_text("three\n")
    assert tokens.matches("one")  # not looked at again within recheck_seconds
    now[0] = 2.0
    assert tokens.matches("three") and not tokens.matches("one")
    path.unlink()  # mid-rotation, or gone: the tokens it had stay
    now[0] = 4.0
    assert tokens.matches("three")


def test_token_auth_without_tokens_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# none yet\n")
    with pytest.raises(ValueError, match="no token"):
        BearerTokens(file=empty)
    assert BearerTokens.from_settings(" ", "") is None


# ---------------------------------------------------------------------------------------------------------------
# Message sizes


@pytest.fixture(scope="module")
async def small_messages_server(tiny_model_dir: Path) -> AsyncIterator[tuple[QAServer, str]]:
    settings = tiny_settings(tiny_model_dir, max_receive_message_bytes=2048, max_send_message_bytes=512)
    async with serving(settings) as running:
        yield running


async def test_oversized_request_is_resource_exhausted(small_messages_server: tuple[QAServer, str]) -> None:
    async with AsyncQAClient(small_messages_server[1], timeout=5) as client:
        assert await ask(client) == "tiny"
        with pytest.raises(QAServeError) as caught:
            await client.answer(SEED_QUESTION, SEED_CONTEXT * 50)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.message


async def test_oversized_response_is_resource_exhausted(small_messages_server: tuple[QAServer, str]) -> None:
    context = " ".join(f"word{i}" for i in range(60))
    async with AsyncQAClient(small_messages_server[1], timeout=5) as client:
        with pytest.raises(QAServeError) as caught:
            await client.answer(SEED_QUESTION, context, top_k=20)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------------------------------------------------------
# Settings


def test_tokens_come_from_the_environment_only_and_are_redacted() -> None:
    settings = parse_settings([], environ={"QASERVE_AUTH_TOKENS": "s3cret,other"})
    assert settings.auth_tokens.get_secret_value() == "s3cret,other"
    described = settings.describe()
    assert "s3cret" not in described and "auth_tokens=<redacted>" in described
    assert "s3cret" not in repr(settings)
    with pytest.raises(SystemExit):
        parse_settings(["--auth-tokens", "s3cret"], environ={})


@pytest.mark.parametrize(
    "argv",
    [
        ["--tls-cert", "CERT"],
        ["--tls-key", "KEY"],
        ["--tls-client-ca", "CA"],
        ["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"],
        ["--auth-tokens-file", "/nonexistent"],
        ["--log-format", "xml"],
        ["--max-receive-message-bytes", "0"],
        ["--drain-seconds", "-1"],
        ["--keepalive-time-seconds", "0"],
        ["--health-port", "50051"],
    ],
)
def test_inconsistent_security_settings_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, environ={})


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def run(*command: str) -> Ran:
    """Runs a command without blocking the event loop the in-process servers answer on."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return Ran(process.returncode or 0, stdout.decode(), stderr.decode())


async def test_per_model_health_is_readable_without_a_token(token_channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(token_channel).Check(
        health_pb2.HealthCheckRequest(service="qaserve.model.tiny"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
