"""Fixtures for the client tests: the session's fake qaserve server and an address nothing listens on."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

from fake_qaserve import FakeServer, start_fake_server

# Haystack (the QAServeReader tests) sends usage statistics unless this is off when it is first imported.
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    server, stop = start_fake_server()
    yield server
    stop()


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    """The session's fake server with its request log cleared and the whole server SERVING."""
    fake_server.servicer.requests.clear()
    fake_server.servicer.stream_deadlines.clear()
    fake_server.servicer.cancelled_streams = 0
    fake_server.servicer.metadata.clear()
    fake_server.set_health("", health_pb2.HealthCheckResponse.SERVING)
    return fake_server


@pytest.fixture
def unused_target() -> str:
    """A local address with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"
