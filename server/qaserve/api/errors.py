"""The error policy: any exception -> its gRPC code and google.rpc.Status, its HTTP status and JSON bodies,
counted and logged in one place."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from qaserve.errors import InvalidArgument, Overloaded, QAServeError
from qaserve.metrics import Metrics

log = logging.getLogger(__name__)

ERROR_DOMAIN = "qaserve"
INTERNAL_REASON = "INTERNAL"
INTERNAL_MESSAGE = "internal error; the server log has the details"
# Safety net under every message and description sent: they travel in response headers (grpc-message and
# grpc-status-details-bin), which clients refuse past 16 KiB. Values a client sent are already shortened at source.
MAX_TEXT_CHARS = 1024

Metadata = Sequence[tuple[str, str | bytes]]

# The HTTP status of each gRPC code (google.rpc.Code's own mapping, but FAILED_PRECONDITION: 409, a model's state
# conflicting with the request). A domain error's http_status overrides it where the HTTP wire knows better.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


@dataclass(frozen=True)
class ErrorStatus:
    """What a client sees of an error: the gRPC code, the ErrorInfo reason and the full google.rpc.Status; over
    HTTP, a status, headers and a JSON body (qaserve's, or the Open Inference Protocol's `{"error": message}`)."""

    code: grpc.StatusCode
    reason: str
    status: status_pb2.Status
    http_status: int = 500
    field: str = ""
    retry_after: float | None = None

    @property
    def message(self) -> str:
        return str(self.status.message)

    def http_body(self) -> dict[str, object]:
        """qaserve's JSON error: {"error": {"code", "reason", "message", "field"}}; field "" unless one is at fault."""
        return {"error": {"code": self.code.name, "reason": self.reason, "message": self.message, "field": self.field}}

    def v2_body(self) -> dict[str, object]:
        """The Open Inference Protocol's error body."""
        return {"error": self.message}

    def http_headers(self) -> dict[str, str]:
        """Retry-After (whole seconds) on overload; the scheme a 401 asks for."""
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.code is grpc.StatusCode.UNAUTHENTICATED:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def error_status(error: BaseException, metrics: Metrics | None, what: str) -> ErrorStatus:
    """Maps `error` to what the client is told, and counts it (qaserve_errors_total{reason}).

    A QAServeError carries its code, reason and a message safe to send, with BadRequest or RetryInfo where they
    apply. Anything else is a bug or a broken dependency: logged here, once, with its traceback (under `what`, the
    RPC or item it broke), and answered with INTERNAL and a generic message; its text never leaves the server.
    """
    if isinstance(error, QAServeError):
        log.debug("%s: %s %s", what, error.code, error.reason)
        mapped = _domain_status(error)
    else:
        log.error("%s failed", what, exc_info=error)
        details = [error_details_pb2.ErrorInfo(reason=INTERNAL_REASON, domain=ERROR_DOMAIN)]
        mapped = ErrorStatus(grpc.StatusCode.INTERNAL, INTERNAL_REASON, _status("INTERNAL", INTERNAL_MESSAGE, details))
    if metrics is not None:
        metrics.errors.labels(mapped.reason).inc()
    return mapped


async def abort(context: grpc.aio.ServicerContext, error: ErrorStatus, metadata: Metadata = ()) -> NoReturn:
    """Ends the RPC with `error` (from error_status()): code, message and details, plus `metadata` in the trailers.

    Raises grpc.aio.AbortError, which grpc.aio turns into the status; handlers let it pass.
    """
    status = rpc_status.to_status(error.status)
    await context.abort(status.code, status.details, (*status.trailing_metadata, *metadata))
    raise AssertionError("context.abort() returned")  # pragma: no cover - grpc.aio always raises


def is_abort(error: BaseException) -> bool:
    """Whether `error` is grpc.aio ending an RPC that was already given its status (context.abort())."""
    return isinstance(error, grpc.aio.AbortError)


def _domain_status(error: QAServeError) -> ErrorStatus:
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)]
    field, retry_after = "", None
    if isinstance(error, InvalidArgument):
        field = error.field
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=_bounded(error.description))
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(error, Overloaded):
        retry_after = error.retry_after
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    code = grpc.StatusCode[error.code]
    return ErrorStatus(
        code,
        error.reason,
        _status(error.code, str(error), details),
        error.http_status or HTTP_STATUS[code],
        field,
        retry_after,
    )


def _status(code: str, message: str, details: list[Message]) -> status_pb2.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=grpc.StatusCode[code].value[0], message=_bounded(message), details=packed)


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 3] + "..."
