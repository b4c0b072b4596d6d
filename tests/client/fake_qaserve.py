"""A fake qaserve server: a real grpc.aio server with a fake QA servicer and the real health servicer."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

T = TypeVar("T")

SLOW_QUESTION = "slow"
OVERLOAD_QUESTION = "overload"
PLAIN_ERROR_QUESTION = "plain error"
NO_FINAL_QUESTION = "no final"
PROGRESSIVE_WINDOWS = 3
REQUEST_ID_KEY = "x-request-id"


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _invalid_question() -> status_pb2.Status:
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="question: must contain a non-whitespace character",
        details=[
            _packed(error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="qaserve")),
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="question",
                            description="must contain a non-whitespace character",
                        )
                    ]
                )
            ),
        ],
    )


def invalid_question_error(request_id: str | None) -> dict[str, Any]:
    """QAServeError.to_dict() of the error the server gives a blank question, as the client should report it."""
    return {
        "code": "INVALID_ARGUMENT",
        "code_number": 3,
        "message": "question: must contain a non-whitespace character",
        "reason": "INVALID_ARGUMENT",
        "field_violations": [{"field": "question", "description": "must contain a non-whitespace character"}],
        "retry_after": None,
        "request_id": request_id,
    }


def _overloaded() -> status_pb2.Status:
    return status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message="server is overloaded",
        details=[
            _packed(error_details_pb2.ErrorInfo(reason="OVERLOADED", domain="qaserve")),
            _packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=250_000_000))),
        ],
    )


def _answers(request: pb.AnswerRequest) -> list[pb.Answer]:
    top_k = request.top_k if request.HasField("top_k") else 1
    answers = []
    for rank, word in enumerate(re.finditer(r"\S+", request.context)):
        if rank == top_k:
            break
        answers.append(
            pb.Answer(
                answer=word.group(),
                score=0.9 / (rank + 1),
                start=word.start(),
                end=word.end(),
                byte_start=len(request.context[: word.start()].encode()),
                byte_end=len(request.context[: word.end()].encode()),
            )
        )
    return answers


async def _abort(context: grpc.aio.ServicerContext, status: status_pb2.Status, request_id: str) -> None:
    # As the real server does: the request id goes along with the status details, which replace the trailers.
    rich = rpc_status.to_status(status)
    await context.abort(rich.code, rich.details, (*rich.trailing_metadata, (REQUEST_ID_KEY, request_id)))


def _response(request: pb.AnswerRequest, request_id: str, windows: int = 1) -> pb.AnswerResponse:
    return pb.AnswerResponse(
        answers=_answers(request),
        model=pb.ModelRef(name=request.model or "fake", revision="sha256:00", device="cpu", dtype="float32"),
        timing=pb.ServerTiming(
            total_seconds=0.5,
            tokenize_seconds=0.1,
            queue_seconds=0.1,
            forward_seconds=0.2,
            decode_seconds=0.1,
        ),
        windows=windows,
        request_id=request_id,
    )


class FakeQAServicer(pb_grpc.QuestionAnsweringServiceServicer):
    """Answers with the context's first top_k words; some questions fail the way the real server does.

    AnswerProgressive pretends every context has PROGRESSIVE_WINDOWS windows and sends a partial after each.
    AnswerMany answers its items one by one; a bad item gets an error Status, PLAIN_ERROR_QUESTION fails the
    whole stream.
    """

    def __init__(self) -> None:
        self.requests: list[pb.AnswerRequest] = []
        # context.time_remaining() at the start of each streaming call: None when it has no deadline.
        self.stream_deadlines: list[float | None] = []
        # AnswerProgressive calls that the client cancelled while they ran.
        self.cancelled_streams = 0
        # The invocation metadata of each call.
        self.metadata: list[dict[str, str]] = []

    def _begin(self, context: grpc.aio.ServicerContext) -> str:
        """Records the call's metadata; returns its request id, the client's or a new one, as the real server."""
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        self.metadata.append(metadata)
        request_id = metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        return request_id

    async def Answer(self, request: pb.AnswerRequest, context: grpc.aio.ServicerContext) -> pb.AnswerResponse:
        request_id = self._begin(context)
        self.requests.append(request)
        if not request.question.strip():
            await _abort(context, _invalid_question(), request_id)
        if request.question == OVERLOAD_QUESTION:
            await _abort(context, _overloaded(), request_id)
        if request.question == PLAIN_ERROR_QUESTION:
            await context.abort(grpc.StatusCode.INTERNAL, "internal error", ((REQUEST_ID_KEY, request_id),))
        if request.question == SLOW_QUESTION:
            await asyncio.sleep(5)
        return _response(request, request_id)

    async def AnswerProgressive(
        self, request: pb.AnswerProgressiveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerProgressiveResponse]:
        request_id = self._begin(context)
        self.requests.append(request.request)
        self.stream_deadlines.append(context.time_remaining())
        if not request.request.question.strip():
            await _abort(context, _invalid_question(), request_id)
        answers = _answers(request.request)
        try:
            for done in range(1, PROGRESSIVE_WINDOWS + 1):
                # Both fail after the first partial, so that the client has seen progress before the error.
                if request.request.question == PLAIN_ERROR_QUESTION and done > 1:
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error", ((REQUEST_ID_KEY, request_id),))
                if request.request.question == SLOW_QUESTION and done > 1:
                    await asyncio.sleep(5)
                partial = pb.PartialAnswer(answers=answers, windows_done=done, windows_total=PROGRESSIVE_WINDOWS)
                yield pb.AnswerProgressiveResponse(partial=partial, request_id=request_id)
            if request.request.question == NO_FINAL_QUESTION:
                return
            final = _response(request.request, request_id, windows=PROGRESSIVE_WINDOWS)
            yield pb.AnswerProgressiveResponse(final=final, request_id=request_id)
        except asyncio.CancelledError:
            self.cancelled_streams += 1
            raise

    async def AnswerMany(
        self, request_iterator: AsyncIterator[pb.AnswerManyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerManyResponse]:
        request_id = self._begin(context)
        self.stream_deadlines.append(context.time_remaining())
        async for item in request_iterator:
            self.requests.append(item.request)
            question = item.request.question
            if not question.strip():
                yield pb.AnswerManyResponse(id=item.id, error=_invalid_question(), request_id=request_id)
            elif question == OVERLOAD_QUESTION:
                yield pb.AnswerManyResponse(id=item.id, error=_overloaded(), request_id=request_id)
            elif question == PLAIN_ERROR_QUESTION:
                await context.abort(grpc.StatusCode.INTERNAL, "internal error", ((REQUEST_ID_KEY, request_id),))
            else:
                if question == SLOW_QUESTION:
                    await asyncio.sleep(5)
                response = _response(item.request, request_id)
                yield pb.AnswerManyResponse(id=item.id, response=response, request_id=request_id)


@dataclass
class FakeServer:
    """The running fake server; its event loop runs on a thread of its own so that sync clients can block."""

    target: str
    servicer: FakeQAServicer
    health: health.aio.HealthServicer
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs `coroutine` on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def set_health(self, service: str, status: int) -> None:
        self.run(self.health.set(service, status))


def start_fake_server() -> tuple[FakeServer, Callable[[], None]]:
    """Starts a fake server on 127.0.0.1, port 0, on a thread of its own; returns it and its stop function."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-qaserve", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, FakeQAServicer, health.aio.HealthServicer, int]:
        server = grpc.aio.server()
        servicer = FakeQAServicer()
        health_servicer = health.aio.HealthServicer()
        pb_grpc.add_QuestionAnsweringServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return server, servicer, health_servicer, port

    server, servicer, health_servicer, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()

    fake = FakeServer(target=f"127.0.0.1:{port}", servicer=servicer, health=health_servicer, loop=loop)
    return fake, stop
