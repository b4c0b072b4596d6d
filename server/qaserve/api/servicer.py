"""QuestionAnsweringService: validate, convert, await the engine, convert back."""

from __future__ import annotations

import grpc

from qaserve.api import converters
from qaserve.api.scope import RpcScope
from qaserve.metrics import Metrics
from qaserve.runtime import QAEngine
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc


class QuestionAnsweringServicer(pb_grpc.QuestionAnsweringServiceServicer):
    """Thin gRPC front of the QAEngine."""

    def __init__(self, engine: QAEngine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def _scope(self, method: str, context: grpc.aio.ServicerContext, model: str) -> RpcScope:
        name = model or self.engine.registry.default
        # Only configured names become label values: clients must not grow the metric's cardinality.
        label = name if name in self.engine.registry.specs else "unknown"
        return RpcScope(self.metrics, method, context, label)

    async def Answer(self, request: pb.AnswerRequest, context: grpc.aio.ServicerContext) -> pb.AnswerResponse:
        async with self._scope("Answer", context, request.model) as scope:
            result = await self.engine.answer(converters.qa_request(request), deadline=scope.deadline())
            return converters.answer_response(result)
        raise AssertionError("unreachable: the scope re-raises or aborts")
