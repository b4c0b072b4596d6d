"""grpc.health.v1 for the server and each model, and the service names health, reflection and auth share."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from qaserve.runtime import ModelState
from qaserve_client.v1 import model_service_pb2, question_answering_pb2

# From the generated descriptors, as the client derives its own: a renamed service cannot go unnoticed.
QA_SERVICE = question_answering_pb2.DESCRIPTOR.services_by_name["QuestionAnsweringService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICES = (reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")
# The services whose health the server reports as a whole ("" is the server itself).
SERVER_HEALTH_NAMES = ("", QA_SERVICE, MODEL_SERVICE)
# The services reflection lists.
REFLECTED_SERVICES = (QA_SERVICE, MODEL_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
# Open without a token: probes and load balancers check health (per-model names included), and tools discover
# the API by reflection; neither says anything a caller could not learn from the published protos and the
# configuration.
OPEN_SERVICES = frozenset({HEALTH_SERVICE, *REFLECTION_SERVICES})
MODEL_HEALTH_PREFIX = "qaserve.model."

ServingStatus = int  # a grpc.health.v1 HealthCheckResponse.ServingStatus value
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_health_name(model: str) -> str:
    """The health service name of a configured model: SERVING exactly while it is ready."""
    return MODEL_HEALTH_PREFIX + model


class DrainingHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 whose Watch streams end at close(): open forever otherwise, they would hold the server's
    stop for its whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if self._closed.is_set():
            await context.write(await self.Check(request, context))
            return
        watch = asyncio.ensure_future(super().Watch(request, context))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((watch, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            closed.cancel()
        if watch.done() and not watch.cancelled() and (error := watch.exception()) is not None:
            raise error

    async def set_server(self, status: ServingStatus) -> None:
        """The status of the server as a whole and of each of its services."""
        for service in SERVER_HEALTH_NAMES:
            await self.set(service, status)

    async def set_models(self, models: Iterable[str], status: ServingStatus) -> None:
        for model in models:
            await self.set(model_health_name(model), status)

    def serving(self, service: str = "") -> bool:
        """Whether `service` ("" = the server) is SERVING now: what the HTTP door's health routes report."""
        return bool(self._server_status.get(service) == SERVING)

    def close(self) -> None:
        """Ends every Watch stream (after the statuses already sent), now and from now on."""
        self._closed.set()


class ModelHealth:
    """The registry's state callback: "qaserve.model.NAME" is SERVING exactly while the model is ready."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self.servicer = servicer
        self._updates: set[asyncio.Task[None]] = set()

    def __call__(self, name: str, state: ModelState) -> None:
        status = SERVING if state is ModelState.READY else NOT_SERVING
        task = asyncio.get_running_loop().create_task(self.servicer.set(model_health_name(name), status))
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)
