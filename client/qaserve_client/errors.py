"""QAServeError and its one conversion from a google.rpc.Status, whether a failed call's or a stream item's."""

from __future__ import annotations

import logging
from typing import Any

import grpc

# googleapis-common-protos ships .pyi files but no py.typed marker.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

REQUEST_ID_KEY = "x-request-id"
"""The metadata key of a call's request id: send it to choose the id; the server returns it as a trailer."""


class QAServeError(Exception):
    """A failed call: the gRPC status plus what the server's google.rpc.Status details say about it.

    Attributes:
        code: The gRPC status code.
        message: The status message.
        reason: ErrorInfo.reason, an UPPER_SNAKE cause such as "OVERLOADED"; None when the server sent none
            (a connection failure, for instance).
        field_violations: BadRequest (field, description) pairs naming the request fields that were rejected.
        retry_after: RetryInfo.retry_delay in seconds: how long to wait before retrying; None when not given.
        request_id: The call's id from the server's `x-request-id` trailer (for an AnswerMany item, the stream's
            id): quote it when asking the server's operators about the failure. None when the server sent none
            (it was not reached, for instance).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = field_violations if field_violations is not None else []
        self.retry_after = retry_after
        self.request_id = request_id

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict: the code's name and number, message, reason, field violations, retry_after
        and request_id."""
        return {
            "code": self.code.name,
            "code_number": self.code.value[0],
            "message": self.message,
            "reason": self.reason,
            "field_violations": [
                {"field": field, "description": description} for field, description in self.field_violations
            ],
            "retry_after": self.retry_after,
            "request_id": self.request_id,
        }


def error_from_status(status: status_pb2.Status, request_id: str | None = None) -> QAServeError:
    """Converts a google.rpc.Status, with its ErrorInfo, BadRequest and RetryInfo details, into a QAServeError.

    This is how AnswerMany reports a failed item, and what a failed call's rich status carries.
    """
    # A status that reports an error with OK, or with a code this grpc does not know, says nothing usable.
    code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN
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
    return QAServeError(
        code,
        status.message,
        reason=reason,
        field_violations=violations,
        retry_after=retry_after,
        request_id=request_id,
    )


def error_from_rpc(error: grpc.RpcError) -> QAServeError:
    """Converts a failed call from either grpc or grpc.aio into a QAServeError."""
    request_id = _request_id(error)
    status = _rich_status(error)
    if status is not None:
        # from_call has checked that the rich status carries the call's own code and message.
        return error_from_status(status, request_id)
    # Both grpc.RpcError raised by a sync call and grpc.aio.AioRpcError are grpc.Call-like with synchronous
    # code()/details()/trailing_metadata(), which is all from_call needs.
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message: str = (error.details() if hasattr(error, "details") else None) or ""
    return QAServeError(code, message, request_id=request_id)


def _request_id(error: grpc.RpcError) -> str | None:
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return value
    return None


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
