"""A fake qaserve server: a real grpc.aio server with a fake QA servicer and the real health servicer."""

from __future__ import annotations

import asyncio
import re
import threading
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


def _response(request: pb.AnswerRequest, windows: int = 1) -> pb.AnswerResponse:
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

    async def Answer(self, request: pb.AnswerRequest, context: grpc.aio.ServicerContext) -> pb.AnswerResponse:
        self.requests.append(request)
        if not request.question.strip():
            await context.abort_with_status(rpc_status.to_status(_invalid_question()))
        if request.question == OVERLOAD_QUESTION:
            await context.abort_with_status(rpc_status.to_status(_overloaded()))
        if request.question == PLAIN_ERROR_QUESTION:
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        if request.question == SLOW_QUESTION:
            await asyncio.sleep(5)
        return _response(request)

    async def AnswerProgressive(
        self, request: pb.AnswerProgressiveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerProgressiveResponse]:
        self.requests.append(request.request)
        self.stream_deadlines.append(context.time_remaining())
        if not request.request.question.strip():
            await context.abort_with_status(rpc_status.to_status(_invalid_question()))
        answers = _answers(request.request)
        try:
            for done in range(1, PROGRESSIVE_WINDOWS + 1):
                # Both fail after the first partial, so that the client has seen progress before the error.
                if request.request.question == PLAIN_ERROR_QUESTION and done > 1:
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                if request.request.question == SLOW_QUESTION and done > 1:
                    await asyncio.sleep(5)
                yield pb.AnswerProgressiveResponse(
                    partial=pb.PartialAnswer(answers=answers, windows_done=done, windows_total=PROGRESSIVE_WINDOWS)
                )
            if request.request.question == NO_FINAL_QUESTION:
                return
            yield pb.AnswerProgressiveResponse(final=_response(request.request, windows=PROGRESSIVE_WINDOWS))
        except asyncio.CancelledError:
            self.cancelled_streams += 1
            raise

    async def AnswerMany(
        self, request_iterator: AsyncIterator[pb.AnswerManyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerManyResponse]:
        self.stream_deadlines.append(context.time_remaining())
        async for item in request_iterator:
            self.requests.append(item.request)
            question = item.request.question
            if not question.strip():
                yield pb.AnswerManyResponse(id=item.id, error=_invalid_question())
            elif question == OVERLOAD_QUESTION:
                yield pb.AnswerManyResponse(id=item.id, error=_overloaded())
            elif question == PLAIN_ERROR_QUESTION:
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            else:
                if question == SLOW_QUESTION:
                    await asyncio.sleep(5)
                yield pb.AnswerManyResponse(id=item.id, response=_response(item.request))


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
