"""QuestionAnsweringService: validate, convert, await the engine, convert back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from qaserve.api import converters
from qaserve.api.errors import error_status
from qaserve.api.scope import RpcScope
from qaserve.api.streams import fan_out
from qaserve.errors import shorten
from qaserve.metrics import Metrics
from qaserve.qa import QAResult
from qaserve.runtime import QAEngine
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc


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

    async def Read(self, request: pb.ReadRequest, context: grpc.aio.ServicerContext) -> pb.ReadResponse:
        async with self._scope("Read", context, request.model) as scope:
            result = await self.engine.read(converters.read_request(request), deadline=scope.deadline())
            scope.timing = result.timing
            return converters.read_response(result, scope.request_id)

    async def AnswerProgressive(
        self, request: pb.AnswerProgressiveRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerProgressiveResponse]:
        sent = 0
        async with self._scope("AnswerProgressive", context, request.request.model) as scope:
            updates = self.engine.answer_progressive(converters.qa_request(request.request), scope.deadline())
            async with contextlib.aclosing(updates):
                async for update in updates:
                    if isinstance(update, QAResult):
                        scope.timing = update.timing
                    yield converters.progressive_response(update, scope.request_id)
                    sent += 1
        self.metrics.stream_items.labels("AnswerProgressive").observe(sent)

    async def AnswerMany(
        self, requests: AsyncIterator[pb.AnswerManyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerManyResponse]:
        sent = 0
        async with self._scope("AnswerMany", context, "") as scope:
            deadline = scope.deadline()
            responses = fan_out(
                requests, lambda item: self._answer_item(item, deadline, scope.request_id), self.stream_max_in_flight
            )
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
                    sent += 1
        self.metrics.stream_items.labels("AnswerMany").observe(sent)

    async def _answer_item(
        self, item: pb.AnswerManyRequest, deadline: float | None, request_id: str
    ) -> pb.AnswerManyResponse:
        """One AnswerMany item: its answer, or its error as a google.rpc.Status while the stream goes on."""
        try:
            result = await self.engine.answer(converters.qa_request(item.request), deadline)
        except Exception as error:
            failed = error_status(error, self.metrics, f"AnswerMany item {shorten(item.id)!r}")
            return pb.AnswerManyResponse(id=item.id, error=failed.status, request_id=request_id)
        answered = converters.answer_response(result, request_id)
        return pb.AnswerManyResponse(id=item.id, response=answered, request_id=request_id)
