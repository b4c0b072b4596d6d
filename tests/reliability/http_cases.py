"""Bad input through the other doors: HTTP (qaserve JSON and the task schema), the Open Inference Protocol over REST
and over gRPC. Each request gets its documented status and the server keeps serving (cases.bad_input runs them)."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .cases import QUESTION, Case, Context, Send, with_leak
from .harness import MODEL, SHORT_CONTEXT
from qaserve_testing import http_request

JSON = "application/json"
V2_SERVICE = "/inference.GRPCInferenceService"


def http(path: str, body: object, content_type: str = JSON) -> Send:
    """A POST: "HTTP <status> <reason> field <field>" from qaserve's error body, "V2" for V2's, "HTTP 200" when OK."""

    async def send(ctx: Context) -> str:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await http_request(ctx.server.http_url + path, data, headers={"Content-Type": content_type})
        if reply.status == 200:
            return "HTTP 200"
        error = reply.json()["error"]
        if isinstance(error, str):  # the Open Inference Protocol's {"error": message}
            return f"HTTP {reply.status} V2" + (" (message leaks a traceback)" if "Traceback" in error else "")
        field = f" field {error['field']}" if error["field"] else ""
        return f"HTTP {reply.status} {error['reason']}{field}"

    return send


def http_raw(data: bytes, pause: float = 0.0) -> Send:
    """Bytes onto the HTTP port: what the server answers (its status line) before it closes the connection."""

    async def send(ctx: Context) -> str:
        host, port = ctx.server.http_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(pause)
            received = await asyncio.wait_for(reader.read(), timeout=60)
        except ConnectionResetError:
            return "connection closed"
        except TimeoutError:
            return "connection left open"
        finally:
            writer.close()
        status = received.split(b"\r\n", 1)[0].decode(errors="replace")
        return f"{status.partition(' ')[2].split(' ')[0]} then closed" if status else "connection closed"

    return send


def v2_body(question: object = QUESTION, context: object = SHORT_CONTEXT, **parameters: Any) -> dict[str, Any]:
    inputs = [{"name": "question", "shape": [1], "datatype": "BYTES", "data": [question]}]
    if context is not None:
        inputs.append({"name": "context", "shape": [1], "datatype": "BYTES", "data": [context]})
    return {"inputs": inputs, "parameters": parameters}


def v2_grpc(
    question: bytes = QUESTION.encode(), model: str = MODEL, raw: bytes | None = None, **parameters: int
) -> Send:
    """A ModelInfer call: "OK" or the status it got."""

    async def send(ctx: Context) -> str:
        request = service_pb2.ModelInferRequest(model_name=model)
        for name, text in (("question", question), ("context", SHORT_CONTEXT.encode())):
            tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
            if raw is None:
                tensor.contents.bytes_contents.append(text)
            else:
                request.raw_input_contents.append(raw if name == "question" else struct.pack("<I", len(text)) + text)
        for key, value in parameters.items():
            request.parameters[key].int64_param = value
        try:
            await service_pb2_grpc.GRPCInferenceServiceStub(ctx.channel).ModelInfer(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            return with_leak(error)
        return "OK"

    return send


def v2_unserved(method: str) -> Send:
    async def send(ctx: Context) -> str:
        try:
            await ctx.channel.unary_unary(f"{V2_SERVICE}/{method}")(b"", timeout=10)
        except grpc.aio.AioRpcError as error:
            return with_leak(error)
        return "OK"

    return send


SEED = {"question": QUESTION, "context": SHORT_CONTEXT}
HEADER_FLOOD = b"".join(b"X-Flood-%d: %s\r\n" % (i, b"y" * 100) for i in range(400))
BAD_INPUT: tuple[Case, ...] = (
    Case(
        "HTTP: question empty", "HTTP 400 INVALID_ARGUMENT field question", http("/v1/answer", {**SEED, "question": ""})
    ),
    Case(
        "HTTP: task schema, top_k 21",
        "HTTP 400 INVALID_ARGUMENT field parameters.top_k",
        http("/", {"inputs": SEED, "parameters": {"top_k": 21}}),
    ),
    Case("HTTP: task schema, inputs a string", "HTTP 400 INVALID_ARGUMENT field inputs", http("/", {"inputs": "Q?"})),
    Case("HTTP: malformed JSON", "HTTP 400 MALFORMED_JSON field body", http("/v1/answer", b'{"question": ')),
    Case(
        "HTTP: form-encoded body (curl -d without a content type)",
        "HTTP 415 UNSUPPORTED_MEDIA_TYPE field Content-Type",
        http("/v1/answer", SEED, "application/x-www-form-urlencoded"),
    ),
    Case(
        "HTTP: unknown field",
        "HTTP 400 INVALID_ARGUMENT field temperature",
        http("/v1/answer", {**SEED, "temperature": 0.7}),
    ),
    Case(
        "HTTP: question a number",
        "HTTP 400 INVALID_ARGUMENT field question",
        http("/v1/answer", {**SEED, "question": 7}),
    ),
    Case("HTTP: unknown model", "HTTP 404 MODEL_NOT_FOUND", http("/models/nope", {"inputs": SEED})),
    Case(
        "HTTP: a body declared at 5 MiB (4 MiB limit)",
        "413 then closed",
        http_raw(b"POST /v1/answer HTTP/1.1\r\nHost: q\r\nContent-Length: 5242880\r\n\r\n{"),
    ),
    Case(
        "HTTP: 40 KiB of headers",
        "431 then closed",
        http_raw(b"GET /health HTTP/1.1\r\nHost: qaserve\r\n" + HEADER_FLOOD + b"\r\n"),
    ),
    Case(
        "HTTP: headers never finished (slowloris)",
        "connection closed",
        http_raw(b"POST /v1/answer HTTP/1.1\r\nHost: qaserve\r\n", pause=3.0),
    ),
    Case(
        "HTTP: body never finished",
        "408 then closed",
        http_raw(
            b"POST /v1/answer HTTP/1.1\r\nHost: q\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{"
        ),
    ),
    Case("HTTP: not HTTP (random bytes)", "400 then closed", http_raw(bytes(range(256)) * 4)),
    Case(
        "V2 REST: question as INT64",
        "HTTP 400 V2",
        http(
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "question", "shape": [1], "datatype": "INT64", "data": [1]}]},
        ),
    ),
    Case("V2 REST: no context", "HTTP 400 V2", http(f"/v2/models/{MODEL}/infer", v2_body(context=None))),
    Case("V2 REST: top_k 0", "HTTP 400 V2", http(f"/v2/models/{MODEL}/infer", v2_body(top_k=0))),
    Case("V2 REST: unknown model", "HTTP 404 V2", http("/v2/models/nope/infer", v2_body())),
    Case("V2 REST: malformed JSON", "HTTP 400 V2", http(f"/v2/models/{MODEL}/infer", b"{")),
    Case("V2 gRPC: question empty", "INVALID_ARGUMENT field question", v2_grpc(b"")),
    Case("V2 gRPC: question not UTF-8", "INVALID_ARGUMENT field inputs.question", v2_grpc(b"\xc3\x28")),
    Case("V2 gRPC: raw BYTES not length-prefixed", "INVALID_ARGUMENT field inputs.question", v2_grpc(raw=b"\xff\xff")),
    Case("V2 gRPC: unknown parameter", "INVALID_ARGUMENT field parameters.temperature", v2_grpc(temperature=1)),
    Case("V2 gRPC: unknown model", "NOT_FOUND MODEL_NOT_FOUND", v2_grpc(model="nope")),
    Case("V2 gRPC: RepositoryIndex (not served)", "UNIMPLEMENTED", v2_unserved("RepositoryIndex")),
)
