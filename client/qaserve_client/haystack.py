"""QAServeReader: a Haystack reader component (ExtractiveReader's inputs and outputs) that reads on a qaserve server.

Needs the `haystack` extra: pip install 'qaserve-client[haystack]'.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from haystack import Document, ExtractedAnswer, component, default_from_dict, default_to_dict
from haystack.utils import Secret, deserialize_secrets_inplace

from qaserve_client.client import DEFAULT_TARGET, DEFAULT_TIMEOUT, QAClient
from qaserve_client.options import Passage, ReadOptions
from qaserve_client.results import PassageAnswer

log = logging.getLogger(__name__)


@component
class QAServeReader:
    """Extracts answers to a query from Documents with a qaserve server's Read call, as a drop-in for Haystack's
    ExtractiveReader: `query` + `documents` in, `answers` (ExtractedAnswer list, best first) out.

    The server scores every span on its own (score_mode "calibrated": ExtractiveReader's sigmoid of the summed
    start and end logits times `calibration_factor`), so answers from different documents compare; near-duplicate
    answers of one document are dropped (`overlap_threshold`), and with `no_answer` an answer with no text
    (data None) carries the probability that none of the others is right. Documents without content are skipped,
    as ExtractiveReader skips them. The model, its device and the batching are the server's: one Read call carries
    every document's windows in shared forward passes.

    ```python
    from haystack import Document, Pipeline
    from qaserve_client.haystack import QAServeReader

    pipeline = Pipeline()
    pipeline.add_component("reader", QAServeReader("localhost:50051"))
    docs = [Document(content="Its capital is Paris."), Document(content="Berlin is in Germany.")]
    result = pipeline.run({"reader": {"query": "What is the capital of France?", "documents": docs}})
    print(result["reader"]["answers"][0].data)
    ```
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        model: str = "",
        token: Secret | None = Secret.from_env_var("QASERVE_TOKEN", strict=False),  # noqa: B008
        timeout: float = DEFAULT_TIMEOUT,
        top_k: int = 20,
        score_threshold: float | None = None,
        max_seq_length: int | None = None,
        stride: int | None = None,
        max_answer_length: int | None = None,
        align_to_words: bool = True,
        no_answer: bool = True,
        calibration_factor: float = 0.1,
        overlap_threshold: float | None = 0.01,
        score_mode: Literal["calibrated", "pipeline"] = "calibrated",
    ) -> None:
        """Reads on the qaserve server at `target` ("host:port"), with the model named `model` ("" = the server's
        default), sending `token` as a bearer token when it resolves to one (default: $QASERVE_TOKEN).

        top_k (1..20), score_threshold, no_answer, calibration_factor and overlap_threshold (None keeps every
        answer) mean what they mean for ExtractiveReader and are its defaults. max_seq_length (tokens per window),
        stride (overlap between a long document's windows) and max_answer_length (tokens) left None take the
        server's defaults (384, 128, 15); ExtractiveReader has no answer length limit. align_to_words widens answers
        to whole words; False gives ExtractiveReader's token spans. score_mode "pipeline" gives each document the
        Hugging Face pipeline's answers instead, whose scores do not compare across documents. `timeout`: seconds
        per call.
        """
        self.target = target
        self.model = model
        self.token = token
        self.timeout = timeout
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.max_seq_length = max_seq_length
        self.stride = stride
        self.max_answer_length = max_answer_length
        self.align_to_words = align_to_words
        self.no_answer = no_answer
        self.calibration_factor = calibration_factor
        self.overlap_threshold = overlap_threshold
        self.score_mode = score_mode
        self._client: QAClient | None = None

    def warm_up(self) -> None:
        """Opens the channel to the server (run() does it on first use otherwise)."""
        if self._client is None:
            token = self.token.resolve_value() if self.token is not None else None
            self._client = QAClient(self.target, timeout=self.timeout, token=token or None)

    def close(self) -> None:
        """Closes the channel; a later run() opens a new one."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def to_dict(self) -> dict[str, Any]:
        """The component as a pipeline file stores it (the token as its environment variable, never its value)."""
        return default_to_dict(
            self,
            target=self.target,
            model=self.model,
            token=self.token.to_dict() if self.token is not None else None,
            timeout=self.timeout,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            max_seq_length=self.max_seq_length,
            stride=self.stride,
            max_answer_length=self.max_answer_length,
            align_to_words=self.align_to_words,
            no_answer=self.no_answer,
            calibration_factor=self.calibration_factor,
            overlap_threshold=self.overlap_threshold,
            score_mode=self.score_mode,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QAServeReader:
        """The component from to_dict()'s form."""
        deserialize_secrets_inplace(data["init_parameters"], keys=["token"])
        reader: QAServeReader = default_from_dict(cls, data)
        return reader

    @component.output_types(answers=list[ExtractedAnswer])
    def run(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
        max_seq_length: int | None = None,
        stride: int | None = None,
        no_answer: bool | None = None,
        overlap_threshold: float | None = None,
    ) -> dict[str, list[ExtractedAnswer]]:
        """Answers to `query` from `documents`, best first; the arguments override the component's settings for
        this run. Raises qaserve_client.QAServeError when the server refuses the call."""
        readable = [doc for doc in documents if _has_text(doc)]
        if len(readable) < len(documents):
            log.warning("%d document(s) without content were skipped", len(documents) - len(readable))
        if not readable:
            return {"answers": []}
        options = ReadOptions(
            model=self.model,
            top_k=top_k or self.top_k,
            max_seq_len=max_seq_length or self.max_seq_length,
            doc_stride=stride or self.stride,
            max_answer_len=self.max_answer_length,
            align_to_words=self.align_to_words,
            score_mode=self.score_mode,
            calibration_factor=self.calibration_factor,
            score_threshold=score_threshold if score_threshold is not None else self.score_threshold,
            no_answer=no_answer if no_answer is not None else self.no_answer,
            # None keeps every answer; the server's overlap_threshold 1 does the same.
            overlap_threshold=_overlap(overlap_threshold if overlap_threshold is not None else self.overlap_threshold),
        )
        self.warm_up()
        assert self._client is not None
        passages = [Passage(doc.content or "", doc.id) for doc in readable]
        result = self._client.read(query, passages, options)
        answers = [_extracted(query, readable[a.passage_index], a) for a in result.answers]
        if result.no_answer_score is not None and (
            options.score_threshold is None or result.no_answer_score >= options.score_threshold
        ):
            answers.append(ExtractedAnswer(query=query, score=result.no_answer_score, data=None, document=None))
            answers.sort(key=lambda answer: answer.score, reverse=True)
        return {"answers": answers}


def _has_text(document: Document) -> bool:
    return document.content is not None and bool(document.content.strip())


def _overlap(threshold: float | None) -> float:
    return 1.0 if threshold is None else threshold


def _extracted(query: str, document: Document, answer: PassageAnswer) -> ExtractedAnswer:
    """A server answer as ExtractedAnswer; like ExtractiveReader, `answer_page_number` in meta when the document's
    meta has an int `page_number` (pages split by form feeds)."""
    meta: dict[str, Any] = {}
    page = document.meta.get("page_number")
    if isinstance(page, int) and document.content:
        meta["answer_page_number"] = page + document.content[: answer.start].count("\f")
    return ExtractedAnswer(
        query=query,
        score=answer.score,
        data=answer.answer,
        document=document,
        document_offset=ExtractedAnswer.Span(answer.start, answer.end),
        meta=meta,
    )
