"""AnswerOptions and ReadOptions, the options of one question, and the one place options become a request."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, TypeVar

from qaserve_client.v1 import question_answering_pb2 as pb


def _option(default: Any, help_text: str, metavar: str = "N") -> Any:
    # The CLI builds its flags from these fields: the help text and metavar live next to the option.
    return field(default=default, metadata={"help": help_text, "metavar": metavar})


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodingOptions:
    """The options Answer and Read share: the model and the Hugging Face pipeline's decoding parameters."""

    model: str = _option("", "configured model name (default: the server's default model)", "NAME")
    top_k: int | None = _option(None, "number of answers, best first (server default: 1)", "K")
    max_answer_len: int | None = _option(None, "longest answer, in tokens (server default: 15)")
    max_seq_len: int | None = _option(None, "tokens per window (server default: min(384, the model's maximum))")
    doc_stride: int | None = _option(
        None, "overlap between windows, in tokens (server default: min(128, max_seq_len/2))"
    )
    max_question_len: int | None = _option(None, "longest question accepted, in tokens (server default: 64)")
    align_to_words: bool | None = _option(None, "widen answers to whole words (server default: yes)", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerOptions(DecodingOptions):
    """How to answer one question: the model and the Hugging Face pipeline's decoding parameters.

    Each field is the AnswerRequest field of the same name. An option left None is not sent, and the server
    applies its documented default; `model` "" selects the server's default model. Build one and pass it to
    answer(), answer_progressive() or a ManyItem, or pass the fields as keyword arguments; keyword arguments
    override the fields of an options object given with them.
    """

    handle_impossible_answer: bool = _option(False, "let the empty answer compete with the spans", "")


class DecodingOptionsFields(TypedDict, total=False):
    """The fields of DecodingOptions as keyword arguments."""

    model: str
    top_k: int | None
    max_answer_len: int | None
    max_seq_len: int | None
    doc_stride: int | None
    max_question_len: int | None
    align_to_words: bool | None


class AnswerOptionsFields(DecodingOptionsFields, total=False):
    """The fields of AnswerOptions as keyword arguments (answer(..., top_k=3)); kept equal to them by a test."""

    handle_impossible_answer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadOptions(DecodingOptions):
    """How to read passages for one question: the model, Answer's decoding parameters (top_k counts answers across
    all passages) and how answers rank across passages.

    Each field is the ReadRequest field of the same name; an option left None is not sent, and the server applies
    its documented default. Pass one to read(), or the fields as keyword arguments, which win.
    """

    score_mode: Literal["calibrated", "pipeline"] | None = _option(
        None,
        "calibrated: every span scored on its own, comparable across passages (server default); pipeline: each "
        "passage's answers as ask gives them, not comparable across passages",
        "MODE",
    )
    calibration_factor: float | None = _option(
        None, "calibrated mode: factor on the summed start and end logits before the sigmoid (server default: 0.1)", "X"
    )
    score_threshold: float | None = _option(None, "leave out answers scoring below this", "X")
    no_answer: bool = _option(False, "also give the no-answer score", "")
    overlap_threshold: float | None = _option(
        None,
        "drop an answer sharing more than this fraction of characters with a better one of its passage; 1 keeps "
        "all (server default: 0.01 calibrated, 1 pipeline)",
        "X",
    )


class ReadOptionsFields(DecodingOptionsFields, total=False):
    """The fields of ReadOptions as keyword arguments (read(..., top_k=3)); kept equal to them by a test."""

    score_mode: Literal["calibrated", "pipeline"] | None
    calibration_factor: float | None
    score_threshold: float | None
    no_answer: bool
    overlap_threshold: float | None


@dataclass(frozen=True, slots=True)
class Passage:
    """One passage to read, with an optional id that its answers carry back (a document id, say)."""

    text: str
    id: str = ""


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AnswerOptions))
"""The names of the AnswerOptions fields, which are also AnswerRequest field names."""

READ_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ReadOptions))
"""The names of the ReadOptions fields, which are also ReadRequest field names."""

_SCORE_MODES = {"calibrated": pb.SCORE_MODE_CALIBRATED, "pipeline": pb.SCORE_MODE_PIPELINE}

_Options = TypeVar("_Options", AnswerOptions, ReadOptions)


def resolve_options(options: _Options | None, overrides: Mapping[str, Any], kind: type[_Options]) -> _Options:
    """`options` (default: all defaults of `kind`) with the keyword arguments `overrides` applied; TypeError for
    an unknown keyword, as a misspelt keyword argument gets."""
    base = options if options is not None else kind()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(unknown)}")
    return dataclasses.replace(base, **overrides) if overrides else base


def option_values(options: AnswerOptions) -> dict[str, Any]:
    """The options as a dict of AnswerRequest field values (None: unset)."""
    return {name: getattr(options, name) for name in OPTION_NAMES}


def answer_request(question: str, context: str, options: AnswerOptions) -> pb.AnswerRequest:
    """Builds the AnswerRequest of one question; a None option stays unset so that the server applies its default."""
    # Passing None for a proto3 optional field leaves it unset (HasField is False).
    return pb.AnswerRequest(question=question, context=context, **option_values(options))


def options_of_request(request: pb.AnswerRequest) -> AnswerOptions:
    """The AnswerOptions an AnswerRequest carries: an unset optional field becomes None."""
    present = {descriptor.name for descriptor, _ in request.ListFields()}
    values: dict[str, Any] = {}
    for name in OPTION_NAMES:
        unset = request.DESCRIPTOR.fields_by_name[name].has_presence and name not in present
        values[name] = None if unset else getattr(request, name)
    return AnswerOptions(**values)


def read_request(question: str, passages: Sequence[str | Passage], options: ReadOptions) -> pb.ReadRequest:
    """Builds the ReadRequest of one question over `passages` (texts, or Passage with an id); a None option stays
    unset so that the server applies its default."""
    if isinstance(passages, str):
        raise TypeError("passages must be a sequence of passages, not one string")
    values = {name: getattr(options, name) for name in READ_OPTION_NAMES}
    mode = values.pop("score_mode")
    if mode is not None and mode not in _SCORE_MODES:
        raise ValueError(f"score_mode must be one of {', '.join(_SCORE_MODES)}, got {mode!r}")
    return pb.ReadRequest(
        question=question,
        passages=[pb.Passage(text=p) if isinstance(p, str) else pb.Passage(text=p.text, id=p.id) for p in passages],
        score_mode=_SCORE_MODES[mode] if mode is not None else pb.SCORE_MODE_UNSPECIFIED,
        **values,
    )
