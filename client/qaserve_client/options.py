"""AnswerOptions, the decoding options of one question, and the one place options become an AnswerRequest."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from qaserve_client.v1 import question_answering_pb2 as pb


def _option(default: Any, help_text: str, metavar: str = "N") -> Any:
    # The CLI builds its flags from these fields: the help text and metavar live next to the option.
    return field(default=default, metadata={"help": help_text, "metavar": metavar})


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerOptions:
    """How to answer one question: the model and the Hugging Face pipeline's decoding parameters.

    Each field is the AnswerRequest field of the same name. An option left None is not sent, and the server
    applies its documented default; `model` "" selects the server's default model. Build one and pass it to
    answer(), answer_progressive() or a ManyItem, or pass the fields as keyword arguments; keyword arguments
    override the fields of an options object given with them.
    """

    model: str = _option("", "configured model name (default: the server's default model)", "NAME")
    top_k: int | None = _option(None, "number of answers, best first (server default: 1)", "K")
    max_answer_len: int | None = _option(None, "longest answer, in tokens (server default: 15)")
    max_seq_len: int | None = _option(None, "tokens per window (server default: min(384, the model's maximum))")
    doc_stride: int | None = _option(
        None, "overlap between windows, in tokens (server default: min(128, max_seq_len/2))"
    )
    max_question_len: int | None = _option(None, "longest question accepted, in tokens (server default: 64)")
    handle_impossible_answer: bool = _option(False, "let the empty answer compete with the spans", "")
    align_to_words: bool | None = _option(None, "widen answers to whole words (server default: yes)", "")


class AnswerOptionsFields(TypedDict, total=False):
    """The fields of AnswerOptions as keyword arguments (answer(..., top_k=3)); kept equal to them by a test."""

    model: str
    top_k: int | None
    max_answer_len: int | None
    max_seq_len: int | None
    doc_stride: int | None
    max_question_len: int | None
    handle_impossible_answer: bool
    align_to_words: bool | None


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AnswerOptions))
"""The names of the AnswerOptions fields, which are also AnswerRequest field names."""


def resolve_options(options: AnswerOptions | None, overrides: Mapping[str, Any]) -> AnswerOptions:
    """`options` (default: all defaults) with the keyword arguments `overrides` applied; TypeError for an unknown
    keyword, as a misspelt keyword argument gets."""
    base = options if options is not None else AnswerOptions()
    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown answer option(s): {', '.join(unknown)}")
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
