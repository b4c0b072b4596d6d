"""The server: the engine and the gRPC server built from Settings, and their lifecycle (start, drain, stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from qaserve.api import ModelServicer, QuestionAnsweringServicer, v2
from qaserve.api.auth import BearerTokenInterceptor, BearerTokens, ServerTLS
from qaserve.api.health import (
    NOT_SERVING,
    OPEN_SERVICES,
    REFLECTED_SERVICES,
    SERVING,
    DrainingHealthServicer,
    ModelHealth,
)
from qaserve.api.http import HttpDoor, HttpListener, bind, create_http_app
from qaserve.api.wire import MalformedRequestInterceptor
from qaserve.config import ConfigError, Settings, models_config
from qaserve.metrics import Metrics, http_address
from qaserve.runtime import QAEngine, build_engine
from qaserve.runtime.reconfigure import Reconfigured
from qaserve.runtime.spec import ModelsConfig
from qaserve.tracing import Tracing
from qaserve_client.v1 import model_service_pb2_grpc
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

log = logging.getLogger("qaserve")


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
        health_servicer: DrainingHealthServicer,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        health_server: grpc.aio.Server | None = None,
        http: HttpListener | None = None,
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
        self.http = http
        self.http_port = http.port if http is not None else None
        self.serving = False
        self._executor = executor
        self._metrics_http: object | None = None
        # Start-up's preload and reloads run one at a time, each reading the file afresh.
        self._models_lock = asyncio.Lock()

    async def start(self) -> None:
        """Starts serving; health reports SERVING once the default model is loaded and warmed up."""
        await self.health.set_server(NOT_SERVING)
        await self.health.set_models(self.engine.registry.specs, NOT_SERVING)
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.http is not None:
            await self.http.start()
        if self.settings.metrics_port:
            address = http_address(self.settings.metrics_host or self.settings.host)
            http_server, _ = start_http_server(self.settings.metrics_port, address, self.metrics.registry)
            self._metrics_http = http_server
            self.metrics_port = http_server.server_port
        async with self._models_lock:
            await self.engine.registry.preload()
        await self.health.set_server(SERVING)
        self.serving = True
        log.info("serving %s", ", ".join(self.engine.registry.specs))

    async def reload_models(self) -> Reconfigured | None:
        """Re-reads --models-config and serves what it says now (ModelRegistry.reconfigure), without failing a
        request in flight. A file that does not read or validate is logged in one line and changes nothing.
        Returns what changed; None when nothing was read (no models file, or a bad one)."""
        if not self.settings.models_config:
            log.info("reload: serving --model %s without --models-config; nothing to reload", self.settings.model)
            return None
        async with self._models_lock:
            try:
                config = await asyncio.to_thread(models_config, self.settings)
            except ConfigError as error:
                log.error("reload: keeping the current models: %s", error)
                return None
            changes = await self.engine.registry.reconfigure(config)
        log.info("reload of %s: %s", self.settings.models_config, changes.describe())
        return changes

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
        self.health.close()
        await asyncio.gather(
            self.grpc_server.stop(self.settings.grace_seconds), *([self.http.stop()] if self.http is not None else [])
        )
        if self.health_server is not None:
            await self.health_server.stop(None)
        await self.engine.registry.close()
        self._executor.shutdown(wait=False)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()


def create_server(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    tracing: Tracing | None = None,
    models: ModelsConfig | None = None,
) -> tuple[QAServer, int]:
    """Builds the server and binds its port (0 picks a free one); `await server.start()` serves. Traces go to
    `tracing`'s provider (None: not traced). `models`: models_config(settings) where the caller has it already."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    health_servicer = DrainingHealthServicer()
    executor = ThreadPoolExecutor(max_workers=settings.tokenize_threads, thread_name_prefix="tokenize")
    engine = build_engine(
        models if models is not None else models_config(settings),
        executor=executor,
        metrics=metrics,
        max_in_flight=settings.max_in_flight,
        max_context_chars=settings.max_context_chars,
        max_passages=settings.max_passages,
        on_state=ModelHealth(health_servicer),
        cache_bytes=settings.response_cache_bytes,
        intra_op_threads=settings.intra_op_threads,
        tokenize_threads=settings.tokenize_threads,
        record_stages=None if tracing is None else tracing.record_stages,
    )
    tokens = BearerTokens.from_settings(settings.auth_tokens.get_secret_value(), settings.auth_tokens_file)
    interceptors: list[grpc.aio.ServerInterceptor] = [] if tokens is None else [BearerTokenInterceptor(tokens, metrics)]
    interceptors.append(MalformedRequestInterceptor(metrics))
    if tracing is not None:  # outermost: rejected calls get their span too
        # Probes and tooling call the open services all the time; a span each would drown the requests.
        interceptors.insert(0, tracing.server_interceptor(untraced=OPEN_SERVICES))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    pb_grpc.add_QuestionAnsweringServiceServicer_to_server(
        QuestionAnsweringServicer(engine, metrics, settings.stream_max_in_flight), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(engine.registry, metrics), server)
    server.add_generic_rpc_handlers((v2.handler(v2.V2Servicer(engine, metrics, health_servicer)),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*REFLECTED_SERVICES, v2.V2_SERVICE), server)
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
    http = None
    if settings.http_port:
        door = HttpDoor(
            engine,
            metrics,
            health_servicer,
            max_body_bytes=settings.max_receive_message_bytes,
            read_timeout=settings.http_read_timeout_seconds,
            tracing=tracing,
        )
        http = HttpListener(
            create_http_app(door, tokens, settings.http_cors_origins),
            bind(settings.host, settings.http_port),
            read_timeout=settings.http_read_timeout_seconds,
            grace=settings.grace_seconds,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_client_ca=settings.tls_client_ca,
        )
    qa_server = QAServer(settings, server, engine, health_servicer, metrics, executor, health_server, http)
    qa_server.port = port
    qa_server.health_port = settings.health_port or None
    return qa_server, port
