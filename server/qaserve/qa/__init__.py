"""Question-answering core: request types, windowing and span decoding (no gRPC, no device handling)."""

from qaserve.qa.decoding import WindowCandidates, decode_answers, merge_candidates, score_windows
from qaserve.qa.types import Answer, ModelRef, QAParams, QAProgress, QARequest, QAResult, Timing
from qaserve.qa.windowing import Windows, split_into_windows

__all__ = [
    "Answer",
    "ModelRef",
    "QAParams",
    "QAProgress",
    "QARequest",
    "QAResult",
    "Timing",
    "WindowCandidates",
    "Windows",
    "decode_answers",
    "merge_candidates",
    "score_windows",
    "split_into_windows",
]
