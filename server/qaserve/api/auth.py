"""Who may call: TLS and mutual-TLS credentials from PEM files, and bearer tokens on every RPC but health and
reflection."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from qaserve.api.errors import ErrorStatus, abort, error_status
from qaserve.api.health import OPEN_SERVICES
from qaserve.errors import Unauthenticated
from qaserve.metrics import Metrics

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
_BEARER = "bearer "


def missing_token() -> Unauthenticated:
    return Unauthenticated(
        "this server requires a bearer token: send the metadata `authorization: Bearer <token>`", "MISSING_TOKEN"
    )


def invalid_token() -> Unauthenticated:
    return Unauthenticated("the bearer token is not valid on this server", "INVALID_TOKEN")


class BearerTokens:
    """The tokens a server accepts: fixed ones (the environment) and those of a file, one a line.

    The file is re-read when it changes (at most once per `recheck_seconds`), so a rotated Kubernetes secret
    takes effect without a restart; a file that cannot be read keeps the tokens it had. Blank lines and lines
    starting with # are ignored. Only SHA-256 digests are kept, and matching compares against every one in
    constant time.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (),
        file: str | os.PathLike[str] | None = None,
        *,
        recheck_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fixed = [_digest(t) for t in (t.strip() for t in tokens) if t]
        self._file = Path(file) if file else None
        self._recheck = recheck_seconds
        self._clock = clock
        self._from_file: list[bytes] = []
        self._file_version: tuple[int, int, int] | None = None
        self._checked = 0.0
        if self._file is not None:
            self._from_file = self._read(self._file)
            self._file_version = _version(self._file)
            self._checked = clock()
        if not self._fixed and not self._from_file:
            raise ValueError("token auth is configured but names no token")

    @classmethod
    def from_settings(cls, env_tokens: str, file: str) -> BearerTokens | None:
        """Tokens from QASERVE_AUTH_TOKENS (comma-separated) and --auth-tokens-file; None when neither is set."""
        if not env_tokens.strip() and not file:
            return None
        return cls(env_tokens.split(","), file or None)

    def __len__(self) -> int:
        self._refresh()
        return len(self._fixed) + len(self._from_file)

    def matches(self, token: str) -> bool:
        """Whether `token` is one of the accepted tokens; the time taken does not depend on which, if any."""
        self._refresh()
        given = _digest(token)
        found = False
        for accepted in (*self._fixed, *self._from_file):
            found |= hmac.compare_digest(given, accepted)
        return found

    def _refresh(self) -> None:
        if self._file is None or self._clock() - self._checked < self._recheck:
            return
        self._checked = self._clock()
        try:
            version = _version(self._file)
            if version == self._file_version:
                return
            tokens = self._read(self._file)
        except OSError as error:
            log.warning("cannot re-read the token file %s, keeping its previous tokens: %s", self._file, error)
            return
        if not tokens and not self._fixed:
            log.warning("the token file %s names no token; keeping its previous tokens", self._file)
            return
        self._from_file, self._file_version = tokens, version
        log.info("re-read the token file %s: %d token(s)", self._file, len(tokens))

    @staticmethod
    def _read(path: Path) -> list[bytes]:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_digest(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects with UNAUTHENTICATED (ErrorInfo MISSING_TOKEN or INVALID_TOKEN) every call to a service outside
    OPEN_SERVICES that lacks `authorization: Bearer <token>` with an accepted token."""

    def __init__(self, tokens: BearerTokens, metrics: Metrics | None = None) -> None:
        self.tokens = tokens
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or _service(details.method) in OPEN_SERVICES:
            return handler
        error = self._check(details.invocation_metadata or ())
        if error is None:
            return handler
        return _rejecting(handler, error_status(error, self.metrics, details.method))

    def _check(self, metadata: Sequence[tuple[str, str | bytes]]) -> Unauthenticated | None:
        for key, value in metadata:
            if key == AUTHORIZATION_KEY:
                return authorization_error(self.tokens, value)
        return missing_token()


def authorization_error(tokens: BearerTokens, authorization: str | bytes | None) -> Unauthenticated | None:
    """What is wrong with an `authorization` value (gRPC metadata or HTTP header), None when it is accepted."""
    if authorization is None:
        return missing_token()
    if not isinstance(authorization, str) or authorization[: len(_BEARER)].lower() != _BEARER:
        return invalid_token()
    return None if tokens.matches(authorization[len(_BEARER) :].strip()) else invalid_token()


def _service(method: str) -> str:
    """The service of a method path: /package.Service/Method -> package.Service."""
    return method.lstrip("/").rpartition("/")[0]


def _rejecting(handler: grpc.RpcMethodHandler, error: ErrorStatus) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with `error` without running it."""

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, error)

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        reject, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever the token's length.
    return hashlib.sha256(token.encode()).digest()


def _version(path: Path) -> tuple[int, int, int]:
    stat = path.stat()  # follows symlinks: a Kubernetes secret volume swaps a symlinked directory
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class ServerTLS:
    """Server credentials from PEM files, re-read when they change so rotated certificates take effect on the
    next handshake without a restart; with `client_ca_file`, clients must present a certificate it signed."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self._files = tuple(Path(f) for f in (cert_file, key_file, client_ca_file) if f)
        self._mutual = bool(client_ca_file)
        self._lock = threading.Lock()
        self._versions = self._current_versions()
        self._initial = self._configuration()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self._mutual
        )

    def _configuration(self) -> Any:
        cert, key, *ca = (f.read_bytes() for f in self._files)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)

    def _current_versions(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(_version(f) for f in self._files)

    def _fetch(self) -> Any:
        """Called by gRPC on each handshake: a new configuration when the files changed, else None."""
        with self._lock:
            try:
                versions = self._current_versions()
                if versions == self._versions:
                    return None
                configuration = self._configuration()
            except OSError as error:
                log.warning("cannot re-read the TLS files, keeping the current ones: %s", error)
                return None
            self._versions = versions
            log.info("re-read the TLS certificate and key")
            return configuration
