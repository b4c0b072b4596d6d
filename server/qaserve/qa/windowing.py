"""Splits question + context into overlapping model windows, as the Hugging Face QA pipeline does."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qaserve.errors import InvalidArgument
from qaserve.qa.types import QAParams

# The Hugging Face question-answering pipeline's defaults.
DEFAULT_TOP_K = 1
DEFAULT_MAX_ANSWER_LEN = 15
DEFAULT_MAX_SEQ_LEN = 384
DEFAULT_DOC_STRIDE = 128
MIN_MAX_SEQ_LEN = 16


@dataclass(frozen=True)
class Windows:
    """One request's windows: token ids for the model and what decoding needs to map tokens back to text."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    # True where a token may begin or end an answer: the context's tokens, plus CLS (the no-answer slot).
    answer_masks: list[list[bool]]
    # tokenizers.Encoding per window: offsets, token_to_word, word_to_chars.
    encodings: list[Any]
    # The context's sequence index inside a window (1 when the question comes first).
    context_index: int

    def __len__(self) -> int:
        return len(self.input_ids)


def resolve_params(params: QAParams, model_max_len: int, defaults: QAParams | None = None) -> QAParams:
    """Fills what the request left unset (None) and checks the model-dependent ranges.

    Each unset field takes `defaults`' value (the model's configured defaults), else the pipeline's: top_k 1,
    max_answer_len 15, max_seq_len 384 or the model's limit. A default doc_stride that does not fit under the
    resolved max_seq_len (the request chose a shorter one) gives way to the pipeline's rule, decided per request
    in split_into_windows.
    """
    defaults = defaults if defaults is not None else QAParams()
    max_seq_len = params.max_seq_len
    if max_seq_len is None:
        max_seq_len = min(defaults.max_seq_len or DEFAULT_MAX_SEQ_LEN, model_max_len)
    elif not MIN_MAX_SEQ_LEN <= max_seq_len <= model_max_len:
        raise InvalidArgument(
            "max_seq_len",
            f"must be between {MIN_MAX_SEQ_LEN} and {model_max_len} for this model, got {max_seq_len}",
        )
    doc_stride = params.doc_stride
    if doc_stride is not None and doc_stride > max_seq_len:
        raise InvalidArgument("doc_stride", f"({doc_stride}) must not be larger than max_seq_len ({max_seq_len})")
    if doc_stride is None and defaults.doc_stride is not None and defaults.doc_stride < max_seq_len:
        doc_stride = defaults.doc_stride
    return dataclasses.replace(
        params,
        top_k=_first(params.top_k, defaults.top_k, DEFAULT_TOP_K),
        max_answer_len=_first(params.max_answer_len, defaults.max_answer_len, DEFAULT_MAX_ANSWER_LEN),
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
    )


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def split_into_windows(tokenizer: Any, question: str, context: str, params: QAParams) -> Windows:
    """Tokenizes into windows of at most params.max_seq_len tokens overlapping by doc_stride.

    `params` must come from resolve_params. Raises InvalidArgument when the question or the context has no
    tokens, the question leaves no room for context, or the context needs several windows and doc_stride does
    not fit the room left.
    """
    assert params.max_seq_len is not None
    question = question.lstrip()
    question_first = tokenizer.padding_side == "right"
    question_len = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    if question_len == 0:
        raise InvalidArgument("question", "has no tokens for this model's tokenizer")
    if question_len > params.max_question_len:
        raise InvalidArgument("question", f"is {question_len} tokens; max_question_len is {params.max_question_len}")
    room = params.max_seq_len - question_len - tokenizer.num_special_tokens_to_add(pair=True)
    if room < 1:
        raise InvalidArgument(
            "question",
            f"is {question_len} tokens, leaving no room for context in max_seq_len {params.max_seq_len}",
        )
    if params.doc_stride is None:
        # The pipeline's default; kept below the room the tokenizer needs to make progress between windows.
        doc_stride = min(DEFAULT_DOC_STRIDE, params.max_seq_len // 2, room - 1)
    else:
        # A stride the windows cannot hold only matters when the context needs more than one window: the
        # pipeline's tokenizer checks it only when it splits, so a context that fits one window is answered.
        doc_stride = min(params.doc_stride, room - 1)

    encoded = tokenizer(
        text=question if question_first else context,
        text_pair=context if question_first else question,
        truncation="only_second" if question_first else "only_first",
        max_length=params.max_seq_len,
        stride=doc_stride,
        return_token_type_ids=True,
        return_overflowing_tokens=True,
    )
    context_index = 1 if question_first else 0
    encodings = encoded.encodings
    if params.doc_stride is not None and params.doc_stride >= room and len(encodings) > 1:
        raise InvalidArgument(
            "doc_stride",
            f"({params.doc_stride}) must be smaller than the {room} context tokens a window holds "
            f"(max_seq_len {params.max_seq_len} minus the question and special tokens) when the context needs "
            "more than one window",
        )
    if not any(seq == context_index for seq in encodings[0].sequence_ids):
        raise InvalidArgument("context", "has no tokens for this model's tokenizer")
    cls_id = tokenizer.cls_token_id
    answer_masks = [
        [seq == context_index or token == cls_id for seq, token in zip(enc.sequence_ids, enc.ids, strict=True)]
        for enc in encodings
    ]
    uses_token_types = "token_type_ids" in tokenizer.model_input_names
    return Windows(
        input_ids=[list(enc.ids) for enc in encodings],
        token_type_ids=[list(enc.type_ids) for enc in encodings] if uses_token_types else None,
        answer_masks=answer_masks,
        encodings=list(encodings),
        context_index=context_index,
    )
