"""QAServeError and the one conversion from grpc.RpcError, rich google.rpc.Status details included."""

from __future__ import annotations

import logging

import grpc

# googleapis-common-protos ships .pyi files but no py.typed marker.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

logger = logging.getLogger(__name__)


class QAServeError(Exception):
    """A failed call: the gRPC status plus what the server's google.rpc.Status details say about it.

    Attributes:
        code: The gRPC status code.
        message: The status message.
        reason: ErrorInfo.reason, an UPPER_SNAKE cause such as "OVERLOADED"; None when the server sent none
            (a connection failure, for instance).
        field_violations: BadRequest (field, description) pairs naming the request fields that were rejected.
        retry_after: RetryInfo.retry_delay in seconds: how long to wait before retrying; None when not given.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = field_violations if field_violations is not None else []
        self.retry_after = retry_after


def error_from_rpc(error: grpc.RpcError) -> QAServeError:
    """Converts a failed call from either grpc or grpc.aio into a QAServeError."""
    # Both grpc.RpcError raised by a sync call and grpc.aio.AioRpcError are grpc.Call-like with synchronous
    # code()/details()/trailing_metadata(), which is all from_call needs.
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message: str = (error.details() if hasattr(error, "details") else None) or ""
    status = _rich_status(error)
    if status is None:
        return QAServeError(code, message)
    reason: str | None = None
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    for detail in status.details:
        # Any.Unpack returns False, leaving the message empty, when the detail is of another type.
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason or None
        elif detail.Unpack(bad_request):
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
        elif detail.Unpack(retry_info):
            retry_after = retry_info.retry_delay.ToTimedelta().total_seconds()
    return QAServeError(code, message, reason=reason, field_violations=violations, retry_after=retry_after)


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    if not hasattr(error, "trailing_metadata"):
        return None
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:
        # The details disagree with the call's own status; trust the status and drop the details.
        logger.warning("ignoring google.rpc.Status details that contradict the call status", exc_info=True)
        return None
    return status
