"""Question-answering core: request types, windowing and span decoding (no gRPC, no device handling)."""

from qaserve.qa.decoding import decode_answers
from qaserve.qa.types import Answer, ModelRef, QAParams, QARequest, QAResult, Timing
from qaserve.qa.windowing import Windows, split_into_windows

__all__ = [
    "Answer",
    "ModelRef",
    "QAParams",
    "QARequest",
    "QAResult",
    "Timing",
    "Windows",
    "decode_answers",
    "split_into_windows",
]
