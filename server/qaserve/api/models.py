"""ModelService: list, describe, load and unload the configured models."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from qaserve.api.scope import RpcScope
from qaserve.metrics import Metrics
from qaserve.runtime.cache_entry import ModelInfo, ModelState
from qaserve.runtime.registry import ModelRegistry
from qaserve_client.v1 import model_service_pb2 as pb
from qaserve_client.v1 import model_service_pb2_grpc as pb_grpc

STATES = {
    ModelState.UNLOADED: pb.MODEL_STATE_UNLOADED,
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}


def model_message(info: ModelInfo) -> pb.Model:
    """ModelInfo -> Model."""
    message = pb.Model(
        name=info.name,
        state=STATES[info.state],
        is_default=info.is_default,
        pinned=info.pinned,
        devices=list(info.devices),
        dtype=info.dtype,
        bytes=info.bytes,
        revision=info.revision,
        error=info.error,
    )
    if info.last_used is not None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(info.last_used * 1e9))
        message.last_used_time.CopyFrom(stamp)
    return message


class ModelServicer(pb_grpc.ModelServiceServicer):
    """Thin gRPC front of the ModelRegistry."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def _scope(self, method: str, context: grpc.aio.ServicerContext, name: str) -> RpcScope:
        return RpcScope(self.metrics, method, context, self.registry.label(name))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async with self._scope("ListModels", context, "") as scope:
            models = [model_message(i) for i in self.registry.infos()]
            return pb.ListModelsResponse(models=models, request_id=scope.request_id)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        async with self._scope("GetModel", context, request.name) as scope:
            model = model_message(self.registry.info(request.name))
            return pb.GetModelResponse(model=model, request_id=scope.request_id)

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        async with self._scope("LoadModel", context, request.name) as scope:
            model = model_message(await self.registry.load(request.name))
            return pb.LoadModelResponse(model=model, request_id=scope.request_id)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        async with self._scope("UnloadModel", context, request.name) as scope:
            model = model_message(await self.registry.unload(request.name))
            return pb.UnloadModelResponse(model=model, request_id=scope.request_id)
