"""The HTTP listener: uvicorn serving the app as a task of the server's own event loop, within bounds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# Request line and headers together (h11 answers 400 past it): gRPC's own default metadata limit is 8 KiB.
MAX_HEADER_BYTES = 16 * 1024
# Idle keep-alive connections close after this long.
KEEP_ALIVE_SECONDS = 5


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host` (gRPC style: "[::]" is every address, IPv4 too) and `port`.

    Raises RuntimeError("Failed to bind ...") as grpc does for a port it cannot listen on."""
    address = host.removeprefix("[").removesuffix("]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it a response's
    # headers and body wait on the client's delayed ACK (some 40 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address, port))
    except OSError as error:
        sock.close()
        raise RuntimeError(f"Failed to bind to address {host}:{port} for HTTP: {error.strerror}") from None
    return sock


class _Config(uvicorn.Config):
    header_timeout: float = 30.0


class _BoundedH11Protocol(H11Protocol):
    """h11 with a deadline on each request's headers: a client that trickles them (slowloris) is cut off after
    the read timeout, as uvicorn itself only times out idle keep-alive connections."""

    config: _Config

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._await_headers()  # a new request has begun (or is about to): its headers have a deadline
        elif self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._headers_due is None:
            self._headers_due = self.loop.call_later(self.config.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._headers_due = None
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn leaving signals to the process: `qaserve serve` drains both doors on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """Serves `app` on `sock` from start() until stop(), which lets requests in flight finish within `grace`."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        *,
        read_timeout: float,
        grace: float,
        tls_cert: str = "",
        tls_key: str = "",
        tls_client_ca: str = "",
    ) -> None:
        config = _Config(
            app,
            http=_BoundedH11Protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=math.ceil(grace),
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
            ssl_ca_certs=tls_client_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        config.header_timeout = read_timeout
        # uvicorn's own start and stop lines would say "server process", which this is not; warnings still show.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP listener stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops accepting, then waits for requests in flight (up to the grace) and closes every connection."""
        if self._task is None:
            self.sock.close()
            return
        self._server.should_exit = True
        await self._task
