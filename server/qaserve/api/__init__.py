"""gRPC layer: servicers, pb<->domain converters and the error->status mapping (no torch imports here)."""

from qaserve.api.models import ModelServicer
from qaserve.api.servicer import QuestionAnsweringServicer

__all__ = ["ModelServicer", "QuestionAnsweringServicer"]
