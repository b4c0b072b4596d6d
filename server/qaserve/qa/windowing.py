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
    """Tokenizes into windows of at most params.max_seq_len tokens overlapping by doc_stride, with a fast
    transformers tokenizer (WindowSplitter(tokenizer).split: build the splitter once where it is called often).

    `params` must come from resolve_params. Raises InvalidArgument when the question or the context has no
    tokens, the question leaves no room for context, or the context needs several windows and doc_stride does
    not fit the room left.
    """
    return WindowSplitter(tokenizer).split(question, context, params)


class WindowSplitter:
    """Splits question + context into windows with a fast transformers tokenizer's Rust tokenizer, called directly.

    The encodings are exactly the transformers call's (`tokenizer(question, context, truncation="only_second",
    max_length=..., stride=..., return_overflowing_tokens=True)`, the question second for tokenizers that pad on
    the left): the same settings go to the same Rust tokenizer, without the wrapper's argument handling and
    conversion of every window into Python lists. A call sets truncation on that Rust tokenizer, so a splitter
    (and its tokenizer) serves one thread at a time.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._rust = tokenizer.backend_tokenizer
        # The pipeline puts the question first unless the tokenizer pads on the left.
        self._question_first = tokenizer.padding_side == "right"
        self._context_index = 1 if self._question_first else 0
        self._truncation = "only_second" if self._question_first else "only_first"
        self._truncation_side = tokenizer.truncation_side
        self._split_special_tokens = tokenizer.split_special_tokens
        self._pair_specials = self._rust.num_special_tokens_to_add(True)
        self._cls_id = tokenizer.cls_token_id
        self._uses_token_types = "token_type_ids" in tokenizer.model_input_names

    def split(self, question: str, context: str, params: QAParams) -> Windows:
        """split_into_windows with this splitter's tokenizer."""
        assert params.max_seq_len is not None
        question = question.lstrip()
        rust = self._rust
        # As the transformers call does: no padding, special tokens in the text kept whole (unless the tokenizer
        # splits them), and the question counted without truncation.
        if rust.padding is not None:
            rust.no_padding()
        if rust.encode_special_tokens != self._split_special_tokens:
            rust.encode_special_tokens = self._split_special_tokens
        if rust.truncation is not None:
            rust.no_truncation()
        question_len = len(rust.encode(question, add_special_tokens=False).ids)
        if question_len == 0:
            raise InvalidArgument("question", "has no tokens for this model's tokenizer")
        if question_len > params.max_question_len:
            raise InvalidArgument(
                "question", f"is {question_len} tokens; max_question_len is {params.max_question_len}"
            )
        room = params.max_seq_len - question_len - self._pair_specials
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

        rust.enable_truncation(
            params.max_seq_len, stride=doc_stride, strategy=self._truncation, direction=self._truncation_side
        )
        first, second = (question, context) if self._question_first else (context, question)
        encoding = rust.encode(first, second)
        encodings = [encoding, *encoding.overflowing]
        if params.doc_stride is not None and params.doc_stride >= room and len(encodings) > 1:
            raise InvalidArgument(
                "doc_stride",
                f"({params.doc_stride}) must be smaller than the {room} context tokens a window holds "
                f"(max_seq_len {params.max_seq_len} minus the question and special tokens) when the context needs "
                "more than one window",
            )
        context_index, cls_id = self._context_index, self._cls_id
        sequence_ids = [enc.sequence_ids for enc in encodings]
        if context_index not in sequence_ids[0]:
            raise InvalidArgument("context", "has no tokens for this model's tokenizer")
        input_ids = [enc.ids for enc in encodings]
        answer_masks = [
            [seq == context_index or token == cls_id for seq, token in zip(seqs, ids, strict=True)]
            for seqs, ids in zip(sequence_ids, input_ids, strict=True)
        ]
        return Windows(
            input_ids=input_ids,
            token_type_ids=[enc.type_ids for enc in encodings] if self._uses_token_types else None,
            answer_masks=answer_masks,
            encodings=encodings,
            context_index=context_index,
        )
