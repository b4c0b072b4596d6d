"""The one mapping from domain errors to gRPC status with google.rpc error details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from qaserve.errors import InvalidArgument, Overloaded, QAServeError

log = logging.getLogger(__name__)

ERROR_DOMAIN = "qaserve"
INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_code(error: QAServeError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def to_status(error: QAServeError) -> grpc.Status:
    """A domain error as a grpc.Status carrying ErrorInfo, plus BadRequest or RetryInfo where they apply."""
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)]
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(error, Overloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    code = getattr(code_pb2, error.code)
    return rpc_status.to_status(status_pb2.Status(code=code, message=str(error), details=packed))


def internal_status() -> grpc.Status:
    """What a client sees of an unexpected error: a generic message (the traceback goes to the log)."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE, details=[info]))
