"""The types the client returns: frozen dataclasses that mirror AnswerResponse and the streams' messages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qaserve_client.errors import QAServeError


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer span; offsets are half-open, in code points (start/end) and UTF-8 bytes (byte_*)."""

    answer: str
    score: float
    start: int
    end: int
    byte_start: int
    byte_end: int


@dataclass(frozen=True, slots=True)
class ModelRef:
    """The model that answered: configured name, loaded revision, device and dtype."""

    name: str
    revision: str
    device: str
    dtype: str


@dataclass(frozen=True, slots=True)
class ServerTiming:
    """Where the server spent one request's time, in seconds."""

    total_seconds: float
    tokenize_seconds: float
    queue_seconds: float
    forward_seconds: float
    decode_seconds: float
    # An answer from the server's response cache: no model ran and the stage timings are 0.
    cached: bool = False


@dataclass(frozen=True, slots=True)
class AnswerResult:
    """The answers to one question, best first, with the model that produced them and the server's timing.

    `request_id` is the call's id: the `x-request-id` the client sent, or one the server made; the server's logs
    carry it. Empty from a server that does not return one.
    """

    answers: tuple[Answer, ...]
    model: ModelRef
    timing: ServerTiming
    windows: int
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; answers use the HF pipeline's answer/score/start/end keys."""
        return {
            "answers": [dataclasses.asdict(answer) for answer in self.answers],
            "model": dataclasses.asdict(self.model),
            "timing": dataclasses.asdict(self.timing),
            "windows": self.windows,
            "request_id": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class Progress:
    """The best answers over the windows of a long context scored so far, as answer_progressive reports them."""

    answers: tuple[Answer, ...]
    windows_done: int
    windows_total: int
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict with the same answer keys as AnswerResult.to_dict."""
        return {
            "answers": [dataclasses.asdict(answer) for answer in self.answers],
            "windows_done": self.windows_done,
            "windows_total": self.windows_total,
            "request_id": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class ManyResult:
    """The outcome of one answer_many item: exactly one of `result` and `error` is set.

    `request_id` is the id of the whole AnswerMany call, the same on every item of the stream.
    """

    id: str
    result: AnswerResult | None
    error: QAServeError | None
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Returns {"id", **AnswerResult.to_dict()} for an answer, or {"id", "error": QAServeError.to_dict(),
        "request_id"} for a failed item."""
        if self.result is not None:
            return {"id": self.id, **self.result.to_dict()}
        error = self.error.to_dict() if self.error is not None else None
        return {"id": self.id, "error": error, "request_id": self.request_id}


@dataclass(frozen=True, slots=True)
class PassageAnswer:
    """One answer of a read: offsets are half-open, into the passage `passage_index` (0-based) of the request, in
    code points (start/end) and UTF-8 bytes (byte_*); `passage_id` is that passage's id."""

    answer: str
    score: float
    passage_index: int
    passage_id: str
    start: int
    end: int
    byte_start: int
    byte_end: int


@dataclass(frozen=True, slots=True)
class ReadResult:
    """The answers to one question across passages, best first, with the model, the server's timing and the
    score mode ("calibrated" or "pipeline") that scored them.

    `no_answer_score` is set when the read asked for it (no_answer=True): calibrated, the probability that none of
    the top_k answers is right; pipeline, the lowest no-answer probability of any window.
    """

    answers: tuple[PassageAnswer, ...]
    no_answer_score: float | None
    score_mode: str
    model: ModelRef
    timing: ServerTiming
    windows: int
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict."""
        return {
            "answers": [dataclasses.asdict(answer) for answer in self.answers],
            "no_answer_score": self.no_answer_score,
            "score_mode": self.score_mode,
            "model": dataclasses.asdict(self.model),
            "timing": dataclasses.asdict(self.timing),
            "windows": self.windows,
            "request_id": self.request_id,
        }
