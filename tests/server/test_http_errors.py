"""Every error over HTTP (qaserve's JSON), the V2 REST route ({"error": message}) and the V2 gRPC service, from the
one error policy; the HTTP wire's own errors (JSON, content type, fields, size, slow clients); CORS."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import shutil
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2, service_pb2_grpc

from qaserve.server import QAServer, create_server

from qaserve_testing import (
    SEED_CONTEXT,
    SEED_QUESTION,
    HttpReply,
    error_reason,
    free_port,
    http_request,
    in_process_server,
    make_pki,
    tiny_settings,
)

TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024
READ_TIMEOUT = 1.0
ALLOWED_ORIGIN = "https://app.example"


@dataclass(frozen=True)
class Served:
    server: QAServer
    url: str
    target: str


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> AsyncIterator[Served]:
    """The tiny model (pinned) and a broken one, bearer tokens, one request admitted at a time, no response cache,
    a small body limit and read timeout, CORS for one origin."""
    root = tmp_path_factory.mktemp("http-errors")
    (root / "broken").mkdir()
    shutil.copy(tiny_model_dir / "config.json", root / "broken" / "config.json")  # no weights, no tokenizer
    (root / "models.toml").write_text(
        f'default = "tiny"\n\n[[models]]\nname = "tiny"\nsource = "{tiny_model_dir}"\npinned = true\npreload = true\n'
        '\n[[models]]\nname = "spare"\nsource = "broken"\n'
    )
    settings = tiny_settings(
        tiny_model_dir,
        models_config=str(root / "models.toml"),
        http_port=free_port(),
        auth_tokens=TOKEN,
        max_in_flight=1,
        response_cache_bytes=0,
        max_receive_message_bytes=MAX_BODY,
        http_read_timeout_seconds=READ_TIMEOUT,
        http_cors_origins=ALLOWED_ORIGIN,
    )
    server, port = create_server(settings, registry=CollectorRegistry())
    await server.start()
    yield Served(server, f"http://127.0.0.1:{server.http_port}", f"127.0.0.1:{port}")
    await server.stop()


# ---------------------------------------------------------------------------------------------------------------
# One error, three doors


@dataclass(frozen=True)
class Call:
    """What to send: the question, context and model, the decoding parameters, and extra HTTP headers."""

    question: str = SEED_QUESTION
    context: str = SEED_CONTEXT
    model: str = "tiny"
    top_k: int | None = None
    headers: tuple[tuple[str, str], ...] = tuple(AUTH.items())
    v2_timeout_us: int | None = None


async def qaserve_json(served: Served, call: Call) -> HttpReply:
    body: dict[str, Any] = {"question": call.question, "context": call.context, "model": call.model}
    if call.top_k is not None:
        body["topK"] = call.top_k
    return await http_request(f"{served.url}/v1/answer", body, headers=dict(call.headers))


async def v2_rest(served: Served, call: Call) -> HttpReply:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "question", "shape": [1], "datatype": "BYTES", "data": [call.question]},
            {"name": "context", "shape": [1], "datatype": "BYTES", "data": [call.context]},
        ],
        "parameters": {},
    }
    if call.top_k is not None:
        body["parameters"]["top_k"] = call.top_k
    if call.v2_timeout_us is not None:
        body["parameters"]["timeout"] = call.v2_timeout_us
    headers = {k: v for k, v in call.headers if k.lower() != "x-request-timeout"}
    return await http_request(f"{served.url}/v2/models/{call.model}/infer", body, headers=headers)


async def v2_grpc(served: Served, call: Call) -> tuple[grpc.StatusCode, str, str]:
    """The V2 gRPC call's code, message and ErrorInfo reason."""
    request = service_pb2.ModelInferRequest(model_name=call.model)
    for name, text in (("question", call.question), ("context", call.context)):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(text.encode())
    if call.top_k is not None:
        request.parameters["top_k"].int64_param = call.top_k
    if call.v2_timeout_us is not None:
        request.parameters["timeout"].int64_param = call.v2_timeout_us
    metadata = [(k.lower(), v) for k, v in call.headers if k.lower() == "authorization"]
    async with grpc.aio.insecure_channel(served.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=30)
    error = caught.value
    return error.code(), error.details() or "", error_reason(error)


@dataclass(frozen=True)
class Row:
    """An error row: the call that gets it, and its gRPC code, reason, HTTP status and field."""

    call: Call
    code: grpc.StatusCode
    reason: str
    status: int
    field: str = ""


ROWS = {
    "blank question": Row(Call(question="  "), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", 400, "question"),
    "top_k out of range": Row(Call(top_k=99), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", 400, "top_k"),
    "unknown model": Row(Call(model="nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", 404),
    "model failed to load": Row(Call(model="spare"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED", 409),
    "no token": Row(Call(headers=()), grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN", 401),
    "wrong token": Row(
        Call(headers=(("Authorization", "Bearer nope"),)), grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN", 401
    ),
    "deadline too short": Row(
        Call(headers=(*AUTH.items(), ("X-Request-Timeout", "0.000001")), v2_timeout_us=1),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_TOO_SHORT",
        504,
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
async def test_each_error_in_qaserve_json_v2_rest_and_v2_grpc(served: Served, row: Row) -> None:
    await assert_three_forms(served, row)


async def assert_three_forms(served: Served, row: Row) -> None:
    reply = await qaserve_json(served, row.call)
    assert reply.status == row.status, reply.body
    error = reply.json()["error"]
    assert (error["code"], error["reason"], error["field"]) == (row.code.name, row.reason, row.field), error
    assert error["message"] and "Traceback" not in error["message"]
    if row.status == 401:  # refused before the call begins, as the gRPC interceptor does
        assert reply.headers["www-authenticate"] == "Bearer"
    else:
        assert reply.headers["x-request-id"]

    v2_reply = await v2_rest(served, row.call)
    assert v2_reply.status == row.status, v2_reply.body
    assert list(v2_reply.json()) == ["error"] and v2_reply.json()["error"], v2_reply.body

    code, message, reason = await v2_grpc(served, row.call)
    assert (code, reason) == (row.code, row.reason), message


async def test_pinned_model_unload_is_409(served: Served) -> None:
    reply = await http_request(f"{served.url}/v1/models/tiny/unload", method="POST", headers=AUTH)
    assert reply.status == 409
    assert reply.json()["error"]["reason"] == "MODEL_PINNED"


@contextlib.contextmanager
def held_admission(served: Served, held: asyncio.Event, release: asyncio.Event) -> Any:
    """The next request keeps the one admission slot (`held` set) until `release` is set."""
    registry = served.server.engine.registry
    real_use = registry.use

    @contextlib.asynccontextmanager
    async def held_use(name: str) -> AsyncIterator[Any]:
        held.set()
        await release.wait()
        async with real_use(name) as serving:
            yield serving

    registry.use = held_use  # type: ignore[method-assign]
    try:
        yield
    finally:
        release.set()
        del registry.use


async def test_overload_is_429_with_retry_after_in_every_form(served: Served) -> None:
    held, release = asyncio.Event(), asyncio.Event()
    with held_admission(served, held, release):
        holder = asyncio.create_task(qaserve_json(served, Call()))
        await asyncio.wait_for(held.wait(), 30)
        reply = await qaserve_json(served, Call())
        assert reply.status == 429 and int(reply.headers["retry-after"]) >= 1, reply.body
        assert reply.json()["error"]["reason"] == "OVERLOADED"
        v2_reply = await v2_rest(served, Call())
        assert v2_reply.status == 429 and int(v2_reply.headers["retry-after"]) >= 1
        code, _, reason = await v2_grpc(served, Call())
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
        release.set()
        assert (await holder).status == 200


@contextlib.contextmanager
def failing_forward(served: Served) -> Any:
    """Every replica's forward pass fails (whichever the batching policy gives the request)."""
    replicas = served.server.engine.registry.loaded("tiny").model.replicas  # type: ignore[union-attr]

    def broken(windows: list[Any]) -> list[Any]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    for replica in replicas:
        replica.forward = broken
    try:
        yield
    finally:
        for replica in replicas:
            del replica.forward


async def test_a_failed_forward_pass_is_500_without_its_text(served: Served) -> None:
    with failing_forward(served):
        await assert_three_forms(served, Row(Call(), grpc.StatusCode.INTERNAL, "INFERENCE_FAILED", 500))
        reply = await qaserve_json(served, Call())
    assert "CUDA" not in reply.body.decode()


async def test_a_stopped_model_is_503(tiny_model_dir: Path) -> None:
    server, port = create_server(
        tiny_settings(tiny_model_dir, http_port=free_port(), response_cache_bytes=0), registry=CollectorRegistry()
    )
    await server.start()
    served = Served(server, f"http://127.0.0.1:{server.http_port}", f"127.0.0.1:{port}")
    try:
        await server.engine.registry.loaded("tiny").batcher.stop(0)  # type: ignore[union-attr]
        await assert_three_forms(served, Row(Call(headers=()), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", 503))
    finally:
        await server.stop()


# ---------------------------------------------------------------------------------------------------------------
# The HTTP wire's own errors, in qaserve's form and V2's


@dataclass(frozen=True)
class Wire:
    body: bytes
    content_type: str
    status: int
    reason: str
    field: str


SEED_JSON = b'{"question": "Q?", "context": "C."}'
V2_JSON = b'{"inputs": [{"name": "question", "shape": [1], "datatype": "BYTES", "data": ["Q?"]}]}'
WIRE = {
    "malformed json": Wire(b'{"question": ', "application/json", 400, "MALFORMED_JSON", "body"),
    "not utf-8": Wire(b'{"question": "\xff"}', "application/json", 400, "MALFORMED_JSON", "body"),
    "wrong content type": Wire(SEED_JSON, "text/plain", 415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type"),
    "form encoded": Wire(SEED_JSON, "application/x-www-form-urlencoded", 415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type"),
    "not an object": Wire(b"[1, 2]", "application/json", 400, "INVALID_ARGUMENT", "body"),
    "body over the limit": Wire(b" " * (MAX_BODY + 1), "application/json", 413, "BODY_TOO_LARGE", ""),
}


@pytest.mark.parametrize("wire", WIRE.values(), ids=WIRE.keys())
async def test_wire_errors_name_what_is_wrong(served: Served, wire: Wire) -> None:
    headers = {**AUTH, "Content-Type": wire.content_type}
    reply = await http_request(f"{served.url}/v1/answer", wire.body, headers=headers)
    assert reply.status == wire.status, reply.body
    error = reply.json()["error"]
    assert (error["reason"], error["field"]) == (wire.reason, wire.field), error
    hf = await http_request(f"{served.url}/models/tiny", wire.body, headers=headers)
    assert hf.status == wire.status and hf.json()["error"]["reason"] == wire.reason, hf.body
    v2_reply = await http_request(f"{served.url}/v2/models/tiny/infer", wire.body, headers=headers)
    assert v2_reply.status == wire.status and list(v2_reply.json()) == ["error"], v2_reply.body


FIELDS = {
    "unknown field": (
        {"question": "Q?", "context": "C.", "temperature": 1},
        "temperature",
        {"inputs": [], "extra": 1},
        "extra",
    ),
    "wrong type": ({"question": 5, "context": "C."}, "question", {"inputs": "x"}, "inputs"),
    "bad number": ({"question": "Q?", "context": "C.", "topK": "many"}, "top_k", {"inputs": [], "id": 5}, "id"),
}


@pytest.mark.parametrize(("qaserve", "field", "v2_body", "v2_field"), FIELDS.values(), ids=FIELDS.keys())
async def test_fields_of_the_wrong_name_or_type_are_named(
    served: Served, qaserve: dict[str, Any], field: str, v2_body: dict[str, Any], v2_field: str
) -> None:
    reply = await http_request(f"{served.url}/v1/answer", qaserve, headers=AUTH)
    assert reply.status == 400 and reply.json()["error"]["field"] in (field, _camel(field)), reply.body
    v2_reply = await http_request(f"{served.url}/v2/models/tiny/infer", v2_body, headers=AUTH)
    assert v2_reply.status == 400 and v2_reply.json()["error"].startswith(v2_field), v2_reply.body


async def test_task_schema_fields_are_named(served: Served) -> None:
    body = {"inputs": {"question": "Q?", "context": "C.", "answer": "x"}}
    reply = await http_request(f"{served.url}/", body, headers=AUTH)
    assert reply.status == 400 and reply.json()["error"]["field"] == "inputs.answer", reply.body
    body = {"inputs": [{"question": "Q?", "context": 3}], "parameters": {"top_k": 2}}
    reply = await http_request(f"{served.url}/", body, headers=AUTH)
    assert reply.status == 400 and reply.json()["error"]["field"] == "inputs.0.context", reply.body


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


async def test_unknown_routes_are_404_in_each_form(served: Served) -> None:
    reply = await http_request(f"{served.url}/v3/answer", {}, headers=AUTH)
    assert reply.status == 404 and reply.json()["error"]["reason"] == "ROUTE_NOT_FOUND"
    v2_reply = await http_request(f"{served.url}/v2/models/tiny/explain", {}, headers=AUTH)
    assert v2_reply.status == 404 and list(v2_reply.json()) == ["error"]
    wrong_method = await http_request(f"{served.url}/v1/answer", headers=AUTH)
    assert wrong_method.status == 405


async def test_probes_and_the_page_need_no_token(served: Served) -> None:
    for path in ("/health", "/v2/health/ready", "/v2/health/live", "/", "/openapi.json"):
        assert (await http_request(served.url + path)).status == 200, path
    assert (await http_request(f"{served.url}/v1/models")).status == 401


# ---------------------------------------------------------------------------------------------------------------
# Slow and oversized clients, CORS


async def raw_exchange(served: Served, chunks: list[bytes], pause: float) -> bytes:
    """Sends `chunks` over a raw connection, waits `pause` s, and returns what the server sent until it closed."""
    host, port = served.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def test_a_client_that_never_finishes_its_headers_is_cut_off(served: Served) -> None:
    received = await raw_exchange(served, [b"POST /v1/answer HTTP/1.1\r\nHost: x\r\n"], READ_TIMEOUT + 0.5)
    assert received == b""  # closed by the server (reader.read() returned at EOF)


async def test_a_client_that_never_finishes_its_body_gets_408(served: Served) -> None:
    head = b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    received = await raw_exchange(served, [head + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode(), b"{"], 0)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b"REQUEST_TIMEOUT" in received


@pytest.mark.parametrize("pieces", [1, 40], ids=["at once", "trickled"])
async def test_oversized_headers_are_refused(served: Served, pieces: int) -> None:
    flood = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Flood-%d: %s\r\n" % (i, b"y" * 100) for i in range(400)
    )
    size = len(flood) // pieces + 1
    chunks = [flood[i : i + size] for i in range(0, len(flood), size)] + [b"\r\n"]
    try:
        received = await raw_exchange(served, chunks, 0)
    except ConnectionResetError:  # refused and closed while the rest was still on its way
        return
    assert received.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), received[:200]


async def test_cors_only_for_the_configured_origins(served: Served) -> None:
    def preflight(origin: str) -> dict[str, str]:
        return {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }

    allowed = await http_request(f"{served.url}/v1/answer", method="OPTIONS", headers=preflight(ALLOWED_ORIGIN))
    assert allowed.status == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = await http_request(f"{served.url}/v1/answer", method="OPTIONS", headers=preflight("https://evil.example"))
    assert "access-control-allow-origin" not in other.headers


async def test_no_cors_by_default(tiny_model_dir: Path) -> None:
    server, _ = create_server(tiny_settings(tiny_model_dir, http_port=free_port()), registry=CollectorRegistry())
    await server.start()
    try:
        headers = {"Origin": ALLOWED_ORIGIN, "Content-Type": "application/json"}
        body = {"question": SEED_QUESTION, "context": SEED_CONTEXT}
        reply = await http_request(f"http://127.0.0.1:{server.http_port}/v1/answer", body, headers=headers)
        assert reply.status == 200 and "access-control-allow-origin" not in reply.headers
    finally:
        await server.stop()


async def test_connections_of_the_http_listener_send_without_delay() -> None:
    """asyncio turns Nagle's algorithm off only on sockets created as TCP; with it on, every response waited on the
    client's delayed ACK (some 40 ms)."""
    from qaserve.api.http import bind

    accepted: asyncio.Queue[int] = asyncio.Queue()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    listener = await asyncio.start_server(on_connection, sock=bind("127.0.0.1", 0))
    async with listener:
        _, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
        assert await asyncio.wait_for(accepted.get(), 10) != 0
        writer.close()


async def test_https_takes_the_grpc_side_certificate_and_its_client_ca(tmp_path: Path, tiny_model_dir: Path) -> None:
    pki = make_pki(tmp_path)
    settings = tiny_settings(
        tiny_model_dir,
        http_port=free_port(),
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )

    def get(url: str, *, client_cert: bool) -> str:
        context = ssl.create_default_context(cafile=str(pki.ca))
        if client_cert:
            context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        try:
            with urllib.request.urlopen(url, timeout=10, context=context) as response:
                return f"{response.status} {response.read().decode()}"
        except (OSError, http.client.HTTPException) as error:  # ssl.SSLError, resets, and the like
            return f"refused: {type(error).__name__}"

    async with in_process_server(settings) as server:
        https = f"https://127.0.0.1:{server.http_port}/health"
        assert await asyncio.to_thread(get, https, client_cert=True) == '200 {"status":"SERVING"}'
        assert (await asyncio.to_thread(get, https, client_cert=False)).startswith("refused")
        plain = f"http://127.0.0.1:{server.http_port}/health"
        assert (await asyncio.to_thread(get, plain, client_cert=True)).startswith("refused")
