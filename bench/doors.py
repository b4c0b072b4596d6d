"""The other doors of a server, driven like its qaserve.v1 gRPC stubs (bench.drive calls `Answer`): HTTP JSON
(POST /v1/answer over keep-alive connections), the Open Inference Protocol over gRPC (ModelInfer), and qaserve.v1's
streams (AnswerMany: every in-flight question on one stream; AnswerProgressive: one stream per question)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.drive import Connection, RequestFailed, requests_of, stubs
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

GRPC, HTTP_JSON, V2_GRPC = "gRPC", "HTTP JSON", "V2 gRPC"
ANSWER_MANY, ANSWER_PROGRESSIVE = "gRPC AnswerMany", "gRPC AnswerProgressive"
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}  # google.rpc.Status.code -> its name


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


class AnswerMany:
    """One AnswerMany stream shared by every slot of a loop: each Answer sends its question as one item with an id
    of its own and waits for the response echoing that id, so a loop's in-flight questions all ride the stream."""

    def __init__(self, stub: pb_grpc.QuestionAnsweringServiceStub) -> None:
        self.outbox: asyncio.Queue[pb.AnswerManyRequest | None] = asyncio.Queue()
        self.waiting: dict[str, asyncio.Future[pb.AnswerManyResponse]] = {}
        self.ids = itertools.count()
        self.failure: Exception | None = None
        self.call = stub.AnswerMany(self._items())  # the stream lasts the whole loop: no deadline on it
        self.reader = asyncio.create_task(self._read())

    async def Answer(self, request: pb.AnswerRequest, timeout: float) -> None:  # noqa: ASYNC109 (as HttpJson.Answer)
        if self.failure is not None:
            raise self.failure
        item = pb.AnswerManyRequest(id=str(next(self.ids)), request=request)
        answered = self.waiting[item.id] = asyncio.get_running_loop().create_future()
        self.outbox.put_nowait(item)
        try:
            response = await asyncio.wait_for(answered, timeout)
        except TimeoutError:
            raise RequestFailed("DEADLINE_EXCEEDED") from None
        finally:
            self.waiting.pop(item.id, None)
        if response.HasField("error"):
            raise RequestFailed(CODE_NAMES.get(response.error.code, f"code {response.error.code}"))

    async def close(self) -> None:
        """Ends the request side and waits for the stream to finish."""
        self.outbox.put_nowait(None)
        await self.reader

    async def _items(self) -> AsyncIterator[pb.AnswerManyRequest]:
        while (item := await self.outbox.get()) is not None:
            yield item

    async def _read(self) -> None:
        try:
            async for response in self.call:
                if (answered := self.waiting.get(response.id)) is not None and not answered.done():
                    answered.set_result(response)
            self.failure = RequestFailed("AnswerMany stream ended")
        except grpc.aio.AioRpcError as error:
            self.failure = error
        for answered in self.waiting.values():
            if not answered.done():
                answered.set_exception(self.failure)


class AnswerProgressive:
    """AnswerProgressive, read to its final message (the answer); a stream without one is an error."""

    def __init__(self, stub: pb_grpc.QuestionAnsweringServiceStub) -> None:
        self.stub = stub

    async def Answer(self, request: pb.AnswerProgressiveRequest, timeout: float) -> None:  # noqa: ASYNC109
        async for response in self.stub.AnswerProgressive(request, timeout=timeout):
            if response.HasField("final"):
                return
        raise RequestFailed("no final answer")


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
    """(stubs, requests) for bench.drive's loops through the door `name` (HTTP_JSON, V2_GRPC, ANSWER_MANY or
    ANSWER_PROGRESSIVE); the streams on a channel made as for the Answer rows (bench.drive.stubs)."""
    if name == HTTP_JSON:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            bodies = [json.dumps({"question": q, "context": c}).encode() for q, c in workload]
            yield [HttpJson(session, http_url)], bodies
        return
    if name == V2_GRPC:
        async with grpc.aio.insecure_channel(target) as channel:
            yield [V2Grpc(channel)], [v2_request(model, q, c) for q, c in workload]
        return
    async with stubs(Connection(target)) as (stub,):
        if name == ANSWER_PROGRESSIVE:
            yield [AnswerProgressive(stub)], [pb.AnswerProgressiveRequest(request=r) for r in requests_of(workload)]
            return
        stream = AnswerMany(stub)
        try:
            yield [stream], requests_of(workload)
        finally:
            await stream.close()
