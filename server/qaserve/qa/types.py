"""Protocol-free request and answer types of the QA core."""

from __future__ import annotations

import enum
import math
import unicodedata
from dataclasses import dataclass, field

from qaserve.errors import InvalidArgument

MAX_TOP_K = 20
# Characters that carry no text for a tokenizer: controls (Cc) and format characters (Cf: soft hyphen U+00AD,
# zero-width space U+200B, joiners, BOM), besides whitespace.
_INVISIBLE = frozenset({"Cc", "Cf"})
VISIBLE_TEXT = "must contain a visible character (not only whitespace, control or zero-width characters)"


def has_visible_text(text: str) -> bool:
    """Whether `text` holds a character that is neither whitespace nor a control or format character."""
    return any(not c.isspace() and unicodedata.category(c) not in _INVISIBLE for c in text)


@dataclass(frozen=True)
class QAParams:
    """Decoding parameters; None = unset: a model resolves it to its configured default, else the Hugging Face
    question-answering pipeline's (qa.windowing.resolve_params). Decoding takes resolved parameters only.
    """

    top_k: int | None = None
    max_answer_len: int | None = None
    max_seq_len: int | None = None
    doc_stride: int | None = None
    max_question_len: int = 64
    handle_impossible_answer: bool = False
    align_to_words: bool = True

    def validate(self) -> None:
        """Checks the ranges that need no model."""
        if self.top_k is not None and not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidArgument("top_k", f"must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        if self.max_answer_len is not None and self.max_answer_len < 1:
            raise InvalidArgument("max_answer_len", f"must be at least 1, got {self.max_answer_len}")
        if self.max_question_len < 1:
            raise InvalidArgument("max_question_len", f"must be at least 1, got {self.max_question_len}")
        if self.doc_stride is not None and self.doc_stride < 0:
            raise InvalidArgument("doc_stride", f"must not be negative, got {self.doc_stride}")


@dataclass(frozen=True)
class QARequest:
    """One question about one context, for the model named `model` ("" = the default)."""

    question: str
    context: str
    model: str = ""
    params: QAParams = field(default_factory=QAParams)

    def validate(self, max_context_chars: int) -> None:
        """Checks what needs no model: non-empty text, context size, numeric ranges."""
        if not has_visible_text(self.question):
            raise InvalidArgument("question", VISIBLE_TEXT)
        if not has_visible_text(self.context):
            raise InvalidArgument("context", VISIBLE_TEXT)
        if len(self.context) > max_context_chars:
            raise InvalidArgument(
                "context",
                f"is {len(self.context)} characters; this server accepts at most {max_context_chars}",
            )
        self.params.validate()


@dataclass(frozen=True)
class Answer:
    """One answer span; start/end are code point offsets, byte_start/byte_end UTF-8 byte offsets."""

    answer: str
    score: float
    start: int
    end: int
    byte_start: int
    byte_end: int


@dataclass(frozen=True)
class ModelRef:
    """Which model answered, and where it ran."""

    name: str
    revision: str
    device: str
    dtype: str


@dataclass(frozen=True)
class Timing:
    """Server-side seconds spent on one request; `cached` answers came from the response cache (stages 0)."""

    total: float = 0.0
    tokenize: float = 0.0
    queue: float = 0.0
    forward: float = 0.0
    decode: float = 0.0
    cached: bool = False


@dataclass(frozen=True)
class QAProgress:
    """The best answers among the windows of a long context scored so far."""

    answers: tuple[Answer, ...]
    windows_done: int
    windows_total: int


@dataclass(frozen=True)
class QAResult:
    """The answers to one request, best first."""

    answers: tuple[Answer, ...]
    model: ModelRef
    timing: Timing
    windows: int


class ScoreMode(enum.Enum):
    """How a reader scores answer spans across passages."""

    # Every span on its own: sigmoid((start logit + end logit) x calibration factor), as Haystack's
    # ExtractiveReader does; scores compare across windows and passages.
    CALIBRATED = "calibrated"
    # The Hugging Face pipeline's per-window softmax, merged per passage as Answer does: exact per passage, not
    # comparable across passages.
    PIPELINE = "pipeline"


# Haystack ExtractiveReader's defaults.
DEFAULT_CALIBRATION_FACTOR = 0.1
DEFAULT_OVERLAP_THRESHOLD = 0.01


@dataclass(frozen=True)
class ReadParams:
    """How a reader ranks answers across passages.

    overlap_threshold None takes the mode's default: Haystack's 0.01 when calibrated, keep every answer (as the
    pipeline does) otherwise. An answer whose span shares more than this fraction of its own or a better answer's
    characters in the same passage is dropped.
    """

    score_mode: ScoreMode = ScoreMode.CALIBRATED
    calibration_factor: float = DEFAULT_CALIBRATION_FACTOR
    score_threshold: float | None = None
    no_answer: bool = False
    overlap_threshold: float | None = None

    def validate(self) -> None:
        if not (math.isfinite(self.calibration_factor) and self.calibration_factor > 0):
            raise InvalidArgument("calibration_factor", f"must be a positive number, got {self.calibration_factor}")
        if self.score_threshold is not None and not math.isfinite(self.score_threshold):
            raise InvalidArgument("score_threshold", f"must be a finite number, got {self.score_threshold}")
        if self.overlap_threshold is not None and not 0.0 <= self.overlap_threshold <= 1.0:
            raise InvalidArgument("overlap_threshold", f"must be between 0 and 1, got {self.overlap_threshold}")

    @property
    def resolved_overlap_threshold(self) -> float | None:
        """The overlap threshold in force; None keeps every answer."""
        if self.overlap_threshold is not None:
            return self.overlap_threshold
        return DEFAULT_OVERLAP_THRESHOLD if self.score_mode is ScoreMode.CALIBRATED else None


@dataclass(frozen=True)
class Passage:
    """One passage of a read request, with the caller's optional id for it."""

    text: str
    id: str = ""


@dataclass(frozen=True)
class ReadRequest:
    """One question over several passages, for the model named `model` ("" = the default)."""

    question: str
    passages: tuple[Passage, ...]
    model: str = ""
    params: QAParams = field(default_factory=QAParams)
    read: ReadParams = field(default_factory=ReadParams)

    def validate(self, max_context_chars: int, max_passages: int) -> None:
        """Checks what needs no model: the question, the passages and their total size, numeric ranges.

        An empty passage among good ones is rejected, not skipped: skipping would hide a caller's bug.
        """
        if not has_visible_text(self.question):
            raise InvalidArgument("question", VISIBLE_TEXT)
        if not self.passages:
            raise InvalidArgument("passages", "must hold at least one passage")
        if len(self.passages) > max_passages:
            raise InvalidArgument(
                "passages", f"holds {len(self.passages)} passages; this server accepts at most {max_passages}"
            )
        for index, passage in enumerate(self.passages):
            if not has_visible_text(passage.text):
                raise InvalidArgument(f"passages[{index}].text", VISIBLE_TEXT)
        total = sum(len(passage.text) for passage in self.passages)
        if total > max_context_chars:
            raise InvalidArgument(
                "passages",
                f"hold {total} characters in all; this server accepts at most {max_context_chars}",
            )
        self.params.validate()
        self.read.validate()


@dataclass(frozen=True)
class PassageAnswer(Answer):
    """An answer of a read request: offsets are into passage `passage_index` (0-based), whose id is `passage_id`."""

    passage_index: int = 0
    passage_id: str = ""


@dataclass(frozen=True)
class ReadResult:
    """A reader's answers across passages, best first; no_answer_score when the request asked for it."""

    answers: tuple[PassageAnswer, ...]
    no_answer_score: float | None
    score_mode: ScoreMode
    model: ModelRef
    timing: Timing
    windows: int
