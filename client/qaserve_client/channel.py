"""Channels to qaserve: TLS and mutual TLS, bearer tokens, round_robin over every address of a name, retries of
UNAVAILABLE, and keepalive."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from qaserve_client._version import __version__
from qaserve_client.v1 import model_service_pb2, question_answering_pb2

# The services the retry policy covers, named from the generated descriptors as the server names them; every RPC
# of them may run twice (answers and model queries are pure, and LoadModel/UnloadModel are idempotent).
RETRIED_SERVICES = (
    question_answering_pb2.DESCRIPTOR.services_by_name["QuestionAnsweringService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    "grpc.health.v1.Health",  # the client does not depend on grpcio-health-checking for its descriptor
)
AUTHORIZATION_KEY = "authorization"

ChannelOption = tuple[str, str | int]


def service_config(*, max_attempts: int = 3) -> dict[str, Any]:
    """The gRPC service config qaserve channels use.

    round_robin: a `dns:///name:port` target that resolves to several servers (a Kubernetes headless Service)
    spreads calls over all of them rather than pinning every call to the first. retryPolicy: a call that fails
    with UNAVAILABLE before the server answered anything (a server stopping or restarting, a model still
    loading, a connection lost) is tried again, on the next server, up to `max_attempts` times in all with
    exponential backoff; retryThrottling stops retrying while most calls fail, so retries never pile up on an
    outage.
    """
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": service} for service in RETRIED_SERVICES],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


def channel_options(*, server_name: str | None = None, max_attempts: int = 3) -> list[ChannelOption]:
    """Channel arguments: user agent, service config, keepalive; `server_name` overrides the name a TLS
    server certificate must carry (for a target given as an IP address, or localhost in a container)."""
    options: list[ChannelOption] = [
        ("grpc.primary_user_agent", _user_agent()),
        ("grpc.service_config", json.dumps(service_config(max_attempts=max_attempts))),
        # Ours, not one a DNS TXT record may publish.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # A ping after 30 s without traffic, also on idle connections, finds a server that vanished without
        # closing them (a node lost, a network partition) within 40 s, rather than at the next call's deadline.
        # qaserve servers accept pings every 10 s (--keepalive-min-ping-interval-seconds); a server that finds
        # them too frequent answers "too_many_pings" and gRPC doubles the interval for that connection.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def tls_credentials(
    ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: the server's certificate is checked against `ca_file` (PEM; default: the system's
    roots); `cert_file` and `key_file` (PEM) are this client's certificate for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file)
    )


def create_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    server_name: str | None = None,
    options: Iterable[ChannelOption] = (),
) -> grpc.Channel:
    """A blocking-API channel to `target` ("host:port", or "dns:///name:port" to balance over every address of a
    name), over TLS when `credentials` are given (tls_credentials()), sending `token` as a bearer token on every
    call. Extra `options` are added after channel_options()."""
    all_options = [*channel_options(server_name=server_name), *options]
    if credentials is not None:
        return grpc.secure_channel(target, _with_token(credentials, token), options=all_options)
    channel = grpc.insecure_channel(target, options=all_options)
    return channel if not token else grpc.intercept_channel(channel, _TokenInterceptor(token))


def create_aio_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    server_name: str | None = None,
    options: Iterable[ChannelOption] = (),
) -> grpc.aio.Channel:
    """create_channel() for grpc.aio."""
    all_options = [*channel_options(server_name=server_name), *options]
    if credentials is not None:
        return grpc.aio.secure_channel(target, _with_token(credentials, token), options=all_options)
    interceptors = _aio_token_interceptors(token) if token else None
    return grpc.aio.insecure_channel(target, options=all_options, interceptors=interceptors)


def _with_token(credentials: grpc.ChannelCredentials, token: str | None) -> grpc.ChannelCredentials:
    if not token:
        return credentials
    # gRPC's own bearer-token call credentials: "authorization: Bearer <token>" on every call, over TLS only.
    return grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))


# Without TLS gRPC refuses to send call credentials, so interceptors add the same metadata. That is for a channel
# to a local proxy or a service-mesh sidecar, which encrypts the hop across the network.


class _ClientCallDetails(
    collections.namedtuple(
        "_ClientCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION_KEY, f"Bearer {token}")

    def _details(self, details: Any) -> _ClientCallDetails:
        return _ClientCallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), self._entry),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AioToken:
    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION_KEY, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        entries: Sequence[tuple[str, str | bytes]] = tuple(details.metadata or ())
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*entries, self._entry),
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files each interceptor under the first kind it is an instance of: one class per kind.


class _AioUnaryUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnaryToken(_AioToken, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _AioStreamStreamToken(_AioToken, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _aio_token_interceptors(token: str) -> list[Any]:
    kinds = (_AioUnaryUnaryToken, _AioUnaryStreamToken, _AioStreamUnaryToken, _AioStreamStreamToken)
    return [kind(token) for kind in kinds]


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _user_agent() -> str:
    return f"qaserve-client/{__version__}"
