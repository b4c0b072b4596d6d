"""`qaserve serve`: builds the gRPC server from Settings and runs it until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
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

from qaserve import __version__
from qaserve.api import ModelServicer, QuestionAnsweringServicer
from qaserve.api.auth import BearerTokenInterceptor, BearerTokens, ServerTLS
from qaserve.api.wire import MalformedRequestInterceptor
from qaserve.config import ConfigError, Settings, models_config, parse_settings
from qaserve.logs import configure_logging
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

    def close(self) -> None:
        """Ends every Watch stream (after the statuses already sent), now and from now on."""
        self._closed.set()


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC server channel arguments: message size limits, keepalive, connection age."""
    options = [
        # A second server on a port in use fails to bind instead of silently sharing the port's connections.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_seconds)),
        # Client pings are welcome this often, with or without calls in flight (clients detect dead servers by
        # them); more frequent ones count as abuse and end the connection.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.keepalive_min_ping_interval_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if settings.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_seconds)),
            ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_seconds)),
        ]
    return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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
        health_server: grpc.aio.Server | None = None,
    ) -> None:
        self.settings = settings
        self.grpc_server = server
        self.health_server = health_server
        self.engine = engine
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.port = 0
        self.health_port: int | None = None
        self.serving = False
        self._executor = executor
        self._metrics_http: object | None = None

    async def start(self) -> None:
        """Starts serving; health reports SERVING once the default model is loaded and warmed up."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.engine.registry.specs:
            await self.health.set(MODEL_HEALTH_PREFIX + name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.settings.metrics_port:
            http_server, _ = start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
            self._metrics_http = http_server
            self.metrics_port = http_server.server_port
        await self.engine.registry.preload()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        log.info("serving %s", ", ".join(self.engine.registry.specs))

    async def drain(self, seconds: float, cut_short: asyncio.Event | None = None) -> None:
        """Health NOT_SERVING (for good) while every request, new or in flight, is still served for `seconds`, or
        until `cut_short` is set: load balancers and probes take the server out of rotation meanwhile."""
        await self.health.enter_graceful_shutdown()
        if cut_short is None:
            await asyncio.sleep(seconds)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cut_short.wait(), seconds)
        log.info("drained; %d request(s) still in flight", self.engine.in_flight)

    async def stop(self) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace, free the models."""
        await self.health.enter_graceful_shutdown()
        if isinstance(self.health, DrainingHealthServicer):
            self.health.close()
        await self.grpc_server.stop(self.settings.grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(None)
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
    health_servicer = DrainingHealthServicer()
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
    tokens = BearerTokens.from_settings(settings.auth_tokens.get_secret_value(), settings.auth_tokens_file)
    interceptors: list[grpc.aio.ServerInterceptor] = [] if tokens is None else [BearerTokenInterceptor(tokens, metrics)]
    interceptors.append(MalformedRequestInterceptor(metrics))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    pb_grpc.add_QuestionAnsweringServiceServicer_to_server(
        QuestionAnsweringServicer(engine, metrics, settings.stream_max_in_flight), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(models, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, MODEL_SERVICE_NAME, health_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert:
        tls = ServerTLS(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        port = server.add_secure_port(address, tls.credentials())
    else:
        port = server.add_insecure_port(address)
    health_server = None
    if settings.health_port:
        # Plaintext and health alone: kubelet's gRPC probes speak neither TLS nor tokens.
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    qa_server = QAServer(settings, server, engine, health_servicer, metrics, executor, health_server)
    qa_server.port = port
    qa_server.health_port = settings.health_port or None
    return qa_server, port


async def serve(settings: Settings) -> int:
    """Runs until SIGINT/SIGTERM, then stops gracefully; returns the exit status (1 when start-up failed)."""
    import torch

    torch.set_num_threads(settings.intra_op_threads or os.cpu_count() or 1)
    try:
        server, port = create_server(settings)
    except (OSError, ValueError) as error:  # a bad models file, certificate or token file: nothing has started
        log.error("invalid configuration: %s", error)
        return 2
    stop = asyncio.Event()
    hurry = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("settings: %s", settings.describe())
    log.info(
        "gRPC on %s:%d (%s%s), health-only port %s, metrics %s",
        settings.host,
        port,
        "mutual TLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext",
        ", bearer tokens" if settings.auth_tokens or settings.auth_tokens_file else "",
        settings.health_port or "off",
        f"on :{settings.metrics_port}/metrics" if settings.metrics_port else "off",
    )
    if (settings.auth_tokens or settings.auth_tokens_file) and not settings.tls_cert:
        log.warning("bearer tokens without TLS cross the network in the clear unless a proxy or mesh encrypts it")
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and not starting.cancelled() and (failure := starting.exception()) is not None:
        # A preloaded model that cannot load leaves nothing to serve: exit, so the operator (or kubelet) sees it.
        log.error("start-up failed: %s", failure)
        stopping.cancel()
        await server.stop()
        return 1
    await stopping
    # SIGTERM (Kubernetes, docker stop) drains: endpoints and client-side balancers need a moment to stop sending
    # here. SIGINT (Ctrl-C) and a second signal skip the drain.
    if received[0] == signal.SIGTERM and server.serving and settings.drain_seconds > 0:
        log.info(
            "SIGTERM: health NOT_SERVING, still serving for %.1fs, then in-flight requests get %.1fs",
            settings.drain_seconds,
            settings.grace_seconds,
        )
        await server.drain(settings.drain_seconds, cut_short=hurry)
    log.info("stopping: in-flight requests get up to %.1fs", settings.grace_seconds)
    starting.cancel()
    await server.stop()
    log.info("stopped")
    return 0


USAGE = "usage: qaserve serve [--FLAG VALUE ...] | qaserve --version   (qaserve serve --help lists the flags)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qaserve` command: exit 0 after a clean stop, 2 for bad configuration (one line naming
    the flag, variable or models-file key), 1 when the server could not start or run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"qaserve {__version__}")
        return 0
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not args or args[0] != "serve":
        print(USAGE, file=sys.stderr)
        return 2
    settings = parse_settings(args[1:])  # exits 2 with one line on a bad flag or QASERVE_* value
    try:
        models_config(settings)  # the models file is checked before anything loads
    except ConfigError as error:
        print(f"qaserve serve: error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return asyncio.run(serve(settings))
    except RuntimeError as error:
        if not str(error).startswith("Failed to bind"):  # grpc's words for a port it cannot listen on
            raise
        log.error("cannot listen: %s (in use, or not an address of this host)", str(error).split(";")[0])
        return 1


if __name__ == "__main__":
    sys.exit(main())
