"""Protocol-free request and answer types of the QA core."""

from __future__ import annotations

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
        p = self.params
        if p.top_k is not None and not 1 <= p.top_k <= MAX_TOP_K:
            raise InvalidArgument("top_k", f"must be between 1 and {MAX_TOP_K}, got {p.top_k}")
        if p.max_answer_len is not None and p.max_answer_len < 1:
            raise InvalidArgument("max_answer_len", f"must be at least 1, got {p.max_answer_len}")
        if p.max_question_len < 1:
            raise InvalidArgument("max_question_len", f"must be at least 1, got {p.max_question_len}")
        if p.doc_stride is not None and p.doc_stride < 0:
            raise InvalidArgument("doc_stride", f"must not be negative, got {p.doc_stride}")


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
