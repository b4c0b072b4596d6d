"""`qaserve serve`: builds the gRPC server from Settings and runs it until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from qaserve.api import ModelServicer, QuestionAnsweringServicer
from qaserve.config import Settings, models_config, parse_settings
from qaserve.metrics import Metrics
from qaserve.runtime import BatchLimits, ModelRegistry, ModelState, QAEngine
from qaserve_client.v1 import model_service_pb2, model_service_pb2_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

log = logging.getLogger("qaserve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QuestionAnsweringService"].full_name
MODEL_SERVICE_NAME = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
MODEL_HEALTH_PREFIX = "qaserve.model."


class ModelHealth:
    """Per-model health: "qaserve.model.NAME" is SERVING exactly while the model is ready."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self.servicer = servicer
        self._updates: set[asyncio.Task[None]] = set()

    def __call__(self, name: str, state: ModelState) -> None:
        ready = state is ModelState.READY
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        task = asyncio.get_running_loop().create_task(self.servicer.set(MODEL_HEALTH_PREFIX + name, status))
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)


class QAServer:
    """The running pieces: gRPC server, health, engine, and the metrics endpoint."""

    def __init__(
        self,
        settings: Settings,
        server: grpc.aio.Server,
        engine: QAEngine,
        health_servicer: health.aio.HealthServicer,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.settings = settings
        self.grpc_server = server
        self.engine = engine
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.port = 0
        self._executor = executor
        self._metrics_http: object | None = None

    async def start(self) -> None:
        """Starts serving; health reports SERVING once the default model is loaded and warmed up."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.engine.registry.specs:
            await self.health.set(MODEL_HEALTH_PREFIX + name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if self.settings.metrics_port:
            http_server, _ = start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
            self._metrics_http = http_server
            self.metrics_port = http_server.server_port
        await self.engine.registry.preload()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", ", ".join(self.engine.registry.specs))

    async def stop(self) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace, free the models."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.settings.grace_seconds)
        await self.engine.registry.close()
        self._executor.shutdown(wait=False)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME, MODEL_SERVICE_NAME):
            await self.health.set(service, status)


def create_server(settings: Settings, registry: CollectorRegistry | None = None) -> tuple[QAServer, int]:
    """Builds the server and binds its port (0 picks a free one); `await server.start()` serves."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    config = models_config(settings)
    limits = BatchLimits(
        max_windows=settings.max_batch_windows,
        max_tokens=settings.max_batch_tokens,
        max_wait=settings.max_wait_ms / 1000.0,
    )
    health_servicer = health.aio.HealthServicer()
    models = ModelRegistry(
        config.models,
        default=config.default,
        limits=limits,
        metrics=metrics,
        max_models=config.max_models,
        max_bytes_per_device=config.max_bytes_per_device,
        on_state=ModelHealth(health_servicer),
    )
    executor = ThreadPoolExecutor(max_workers=settings.tokenize_threads, thread_name_prefix="tokenize")
    engine = QAEngine(
        models,
        executor=executor,
        metrics=metrics,
        max_in_flight=settings.max_in_flight,
        max_context_chars=settings.max_context_chars,
    )
    server = grpc.aio.server()
    pb_grpc.add_QuestionAnsweringServiceServicer_to_server(
        QuestionAnsweringServicer(engine, metrics, settings.stream_max_in_flight), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(models, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, MODEL_SERVICE_NAME, health_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    qa_server = QAServer(settings, server, engine, health_servicer, metrics, executor)
    qa_server.port = port
    return qa_server, port


async def serve(settings: Settings) -> None:
    """Runs until SIGINT/SIGTERM, then stops gracefully."""
    import torch

    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    server, port = create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("settings: %s", settings.describe())
    log.info("gRPC on %s:%d, metrics on :%s/metrics", settings.host, port, settings.metrics_port or "off")
    starting = asyncio.create_task(server.start())
    await stop.wait()
    log.info("stopping: draining in-flight requests for up to %.1fs", settings.grace_seconds)
    starting.cancel()
    await server.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qaserve` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "serve":
        print("usage: qaserve serve [options]   (qaserve serve --help lists them)", file=sys.stderr)
        return 2
    settings = parse_settings(args[1:])
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
