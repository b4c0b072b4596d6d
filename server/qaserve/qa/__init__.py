"""Question-answering core: request types, windowing, span decoding and the reader (no gRPC, no device handling)."""

from qaserve.qa.decoding import RunningMerge, WindowCandidates, decode_answers, merge_candidates, score_windows
from qaserve.qa.reading import read_answers
from qaserve.qa.types import (
    Answer,
    ModelRef,
    Passage,
    PassageAnswer,
    QAParams,
    QAProgress,
    QARequest,
    QAResult,
    ReadParams,
    ReadRequest,
    ReadResult,
    ScoreMode,
    Timing,
)
from qaserve.qa.windowing import Windows, split_into_windows

__all__ = [
    "Answer",
    "ModelRef",
    "Passage",
    "PassageAnswer",
    "QAParams",
    "QAProgress",
    "QARequest",
    "QAResult",
    "ReadParams",
    "ReadRequest",
    "ReadResult",
    "RunningMerge",
    "ScoreMode",
    "Timing",
    "WindowCandidates",
    "Windows",
    "decode_answers",
    "merge_candidates",
    "read_answers",
    "score_windows",
    "split_into_windows",
]
