"""The one mapping from domain errors to google.rpc.Status (code, message, error details) and gRPC status."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from qaserve.errors import InvalidArgument, Overloaded, QAServeError

ERROR_DOMAIN = "qaserve"
INTERNAL_MESSAGE = "internal error; the server log has the details"


def rpc_status_of(error: QAServeError) -> status_pb2.Status:
    """A domain error as google.rpc.Status with ErrorInfo, plus BadRequest or RetryInfo where they apply."""
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)]
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(error, Overloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return _status(getattr(code_pb2, error.code), str(error), details)


def internal_rpc_status() -> status_pb2.Status:
    """What a client sees of an unexpected error: a generic message (the traceback goes to the log)."""
    return _status(
        code_pb2.INTERNAL, INTERNAL_MESSAGE, [error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN)]
    )


def to_status(error: QAServeError) -> grpc.Status:
    """rpc_status_of() as the grpc.Status that context.abort_with_status() sends."""
    return rpc_status.to_status(rpc_status_of(error))


def internal_status() -> grpc.Status:
    return rpc_status.to_status(internal_rpc_status())


def _status(code: int, message: str, details: list[Message]) -> status_pb2.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=message, details=packed)
