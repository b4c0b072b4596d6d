"""The other doors of a server, driven like its qaserve.v1 gRPC stubs (bench.drive calls `Answer`): HTTP JSON
(POST /v1/answer over keep-alive connections) and the Open Inference Protocol over gRPC (ModelInfer)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.drive import RequestFailed

GRPC, HTTP_JSON, V2_GRPC = "gRPC", "HTTP JSON", "V2 gRPC"


class HttpJson:
    """POST /v1/answer with a prepared JSON body."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = f"{url}/v1/answer"

    # The gRPC stub's call signature, timeout included: bench.drive calls both alike.
    async def Answer(self, body: bytes, timeout: float) -> None:  # noqa: ASYNC109
        headers = {"Content-Type": "application/json"}
        limit = aiohttp.ClientTimeout(timeout)
        async with self.session.post(self.url, data=body, headers=headers, timeout=limit) as response:
            await response.read()
            if response.status != 200:
                raise RequestFailed(f"HTTP {response.status}")


class V2Grpc:
    """inference.GRPCInferenceService/ModelInfer with a prepared request."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def Answer(self, request: Any, timeout: float) -> None:  # noqa: ASYNC109 (as HttpJson.Answer)
        await self.stub.ModelInfer(request, timeout=timeout)


def v2_request(model: str, question: str, context: str) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, text in (("question", question), ("context", context)):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(text.encode())
    return request


@contextlib.asynccontextmanager
async def door(
    name: str, target: str, http_url: str, model: str, workload: Sequence[tuple[str, str]]
) -> AsyncIterator[tuple[list[Any], list[Any]]]:
    """(stubs, requests) for bench.drive's loops through the door `name` (HTTP_JSON or V2_GRPC)."""
    if name == HTTP_JSON:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            bodies = [json.dumps({"question": q, "context": c}).encode() for q, c in workload]
            yield [HttpJson(session, http_url)], bodies
        return
    async with grpc.aio.insecure_channel(target) as channel:
        yield [V2Grpc(channel)], [v2_request(model, q, c) for q, c in workload]
