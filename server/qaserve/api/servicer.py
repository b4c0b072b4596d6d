"""QuestionAnsweringService: validate, convert, await the engine, convert back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from qaserve.api import converters
from qaserve.api.errors import internal_rpc_status, rpc_status_of
from qaserve.api.scope import RpcScope
from qaserve.errors import QAServeError
from qaserve.metrics import Metrics
from qaserve.qa import QAProgress
from qaserve.runtime import QAEngine
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class QuestionAnsweringServicer(pb_grpc.QuestionAnsweringServiceServicer):
    """Thin gRPC front of the QAEngine."""

    def __init__(self, engine: QAEngine, metrics: Metrics, stream_max_in_flight: int = 64) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stream_max_in_flight = stream_max_in_flight

    def _scope(self, method: str, context: grpc.aio.ServicerContext, model: str) -> RpcScope:
        return RpcScope(self.metrics, method, context, self.engine.registry.label(model))

    async def Answer(self, request: pb.AnswerRequest, context: grpc.aio.ServicerContext) -> pb.AnswerResponse:
        async with self._scope("Answer", context, request.model) as scope:
            result = await self.engine.answer(converters.qa_request(request), deadline=scope.deadline())
            scope.timing = result.timing
            return converters.answer_response(result, scope.request_id)

    async def AnswerProgressive(
        self, request: pb.AnswerProgressiveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerProgressiveResponse]:
        sent = 0
        async with self._scope("AnswerProgressive", context, request.request.model) as scope:
            updates = self.engine.answer_progressive(converters.qa_request(request.request), scope.deadline())
            async with contextlib.aclosing(updates):
                async for update in updates:
                    if isinstance(update, QAProgress):
                        yield pb.AnswerProgressiveResponse(
                            partial=converters.partial_answer(update), request_id=scope.request_id
                        )
                    else:
                        scope.timing = update.timing
                        yield pb.AnswerProgressiveResponse(
                            final=converters.answer_response(update, scope.request_id), request_id=scope.request_id
                        )
                    sent += 1
        self.metrics.stream_items.labels("AnswerProgressive").observe(sent)

    async def AnswerMany(
        self, requests: AsyncIterator[pb.AnswerManyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerManyResponse]:
        sent = 0
        async with self._scope("AnswerMany", context, "") as scope:
            deadline = scope.deadline()
            # A slot per item in progress or answered but not yet taken by the client: reading stops at the bound.
            slots = asyncio.Semaphore(self.stream_max_in_flight)
            done: asyncio.Queue[pb.AnswerManyResponse | None] = asyncio.Queue()
            items: set[asyncio.Task[None]] = set()

            async def answer_one(item: pb.AnswerManyRequest) -> None:
                try:
                    result = await self.engine.answer(converters.qa_request(item.request), deadline)
                    answered = converters.answer_response(result, scope.request_id)
                    response = pb.AnswerManyResponse(id=item.id, response=answered, request_id=scope.request_id)
                except QAServeError as error:
                    self.metrics.errors.labels(error.reason).inc()
                    response = pb.AnswerManyResponse(
                        id=item.id, error=rpc_status_of(error), request_id=scope.request_id
                    )
                except Exception:
                    log.exception("AnswerMany item %r failed", item.id)
                    self.metrics.errors.labels("INTERNAL").inc()
                    response = pb.AnswerManyResponse(
                        id=item.id, error=internal_rpc_status(), request_id=scope.request_id
                    )
                done.put_nowait(response)

            async def read() -> None:
                # However reading ends, the response loop hears of it: None, then `await reader` re-raises a failure
                # (a malformed or broken request stream) so that the scope turns it into the call's status.
                try:
                    async for item in requests:
                        await slots.acquire()
                        task = asyncio.create_task(answer_one(item))
                        items.add(task)
                        task.add_done_callback(items.discard)
                    while items:
                        await asyncio.wait(set(items))
                finally:
                    done.put_nowait(None)

            reader = asyncio.create_task(read())
            try:
                while (response := await done.get()) is not None:
                    yield response
                    sent += 1
                    slots.release()
                await reader
            finally:
                for task in (reader, *items):
                    task.cancel()
        self.metrics.stream_items.labels("AnswerMany").observe(sent)
