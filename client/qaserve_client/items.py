"""ManyItem: one question of an answer_many stream, with its AnswerOptions."""

from __future__ import annotations

from dataclasses import dataclass

from qaserve_client.options import AnswerOptions, option_values


@dataclass(frozen=True, slots=True)
class ManyItem(AnswerOptions):
    """One question about one context for answer_many; its `id` comes back on the item's ManyResult.

    The options are the AnswerOptions fields, as keyword arguments: ManyItem("a", question, context, top_k=3),
    or ManyItem.of("a", question, context, options). The server does not interpret ids, so keep them unique
    within a stream to tell the results apart.
    """

    id: str
    question: str
    context: str

    @classmethod
    def of(cls, id: str, question: str, context: str, options: AnswerOptions) -> ManyItem:
        """A ManyItem that asks `question` about `context` with `options`."""
        return cls(id, question, context, **option_values(options))
