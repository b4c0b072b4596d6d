"""ManyItem: one question of an answer_many stream, with the same options as QAClient.answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ManyItem:
    """One question about one context for answer_many; its `id` comes back on the item's ManyResult.

    An option left None is not sent, and the server applies its documented default; `model` "" selects the
    server's default model. The server does not interpret ids, so keep them unique within a stream to tell the
    results apart.
    """

    id: str
    question: str
    context: str
    model: str = ""
    top_k: int | None = None
    max_answer_len: int | None = None
    max_seq_len: int | None = None
    doc_stride: int | None = None
    max_question_len: int | None = None
    handle_impossible_answer: bool = False
    align_to_words: bool | None = None
