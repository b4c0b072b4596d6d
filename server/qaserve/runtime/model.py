"""A loaded question-answering model, whatever its backend: the tokenizer, its replicas and what they report."""

from __future__ import annotations

import copy
import json
import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from qaserve.qa import QAParams, Windows, split_into_windows
from qaserve.qa.windowing import resolve_params
from qaserve.runtime.spec import ModelSpec

if TYPE_CHECKING:
    from qaserve.runtime.batcher import Replica

log = logging.getLogger(__name__)

Logits = npt.NDArray[np.float32]


@dataclass(frozen=True)
class WindowInput:
    """One window's model inputs, as queued for a batch."""

    input_ids: list[int]
    token_type_ids: list[int] | None


@dataclass(frozen=True)
class WindowLogits:
    """One window's start and end logits: numpy float32, trimmed to the window's length."""

    start: Logits
    end: Logits


@dataclass
class Loaded:
    """What a backend made of a model: replicas ready to run, and what they report."""

    backend: str  # torch | onnx
    replicas: Sequence[Replica[WindowInput, WindowLogits]]
    dtype: str  # float32, float16, bfloat16, int8
    nbytes: int  # weight bytes held per device
    revision: str  # sha256:<hex> of the weights file, or the hub commit
    max_positions: int | None  # the model config's max_position_embeddings, where it records one
    close: Callable[[], None]  # frees the replicas (on their own threads) and their device memory


class QAModel:
    """Tokenizer + replicas of one model. split() may run on many threads; each replica runs on its own thread."""

    def __init__(self, spec: ModelSpec, tokenizer: Any, loaded: Loaded, tokenizer_copies: int = 2) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        # Copies for concurrent tokenizing: a call sets truncation state on the shared Rust tokenizer, so
        # concurrent calls on one instance would tokenize with each other's settings. One per tokenizing thread,
        # made at load, not by the first requests (a copy takes tens of milliseconds); more are made if more
        # threads tokenize at once.
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(max(1, tokenizer_copies)):
            self._tokenizers.put(copy.deepcopy(tokenizer))
        self._loaded = loaded
        self.backend = loaded.backend
        self.replicas = list(loaded.replicas)
        # Read on every request (its cache key and model reference): fixed at load, so worked out once.
        self.devices = sorted({str(r.device) for r in self.replicas})
        self.revision = loaded.revision
        self.dtype = loaded.dtype
        self.nbytes = loaded.nbytes
        limit = int(tokenizer.model_max_length)
        if limit > 1_000_000 and loaded.max_positions:  # tokenizers without a recorded limit: a huge sentinel
            limit = loaded.max_positions
        self.max_seq_len = limit
        if spec.max_seq_len is not None and spec.max_seq_len > limit:
            raise ValueError(f"max_seq_len {spec.max_seq_len} is longer than this model's limit of {limit} tokens")
        # What requests that leave a parameter unset get (None: the pipeline's default).
        self.defaults = QAParams(
            top_k=spec.top_k,
            max_answer_len=spec.max_answer_len,
            max_seq_len=spec.max_seq_len,
            doc_stride=spec.doc_stride,
        )

    @property
    def name(self) -> str:
        return self.spec.name

    def resolve(self, params: QAParams) -> QAParams:
        """Fills unset parameters from the model's configured defaults, then the pipeline's; checks the
        model-dependent ranges."""
        return resolve_params(params, self.max_seq_len, self.defaults)

    def split(self, question: str, context: str, params: QAParams) -> Windows:
        """Tokenizes into windows (thread-safe); `params` from resolve()."""
        try:
            tokenizer = self._tokenizers.get_nowait()
        except queue.Empty:
            tokenizer = copy.deepcopy(self.tokenizer)
        try:
            return split_into_windows(tokenizer, question, context, params)
        finally:
            self._tokenizers.put(tokenizer)

    @staticmethod
    def inputs(windows: Windows) -> list[WindowInput]:
        types = windows.token_type_ids
        return [WindowInput(ids, types[i] if types is not None else None) for i, ids in enumerate(windows.input_ids)]

    def warm_up(self) -> None:
        """One full-length forward per replica, so the first request does not pay for lazy initialisation."""
        params = self.resolve(QAParams())
        windows = self.split("warm up?", "warm " * (params.max_seq_len or 64), params)
        for replica in self.replicas:
            replica.executor.submit(replica.forward, self.inputs(windows)[:1]).result()

    def close(self) -> None:
        self.replicas.clear()
        self._loaded.close()


def load_tokenizer(source: str, revision: str | None) -> Any:
    """The model's fast (Rust) tokenizer.

    A local directory naming its tokenizer class is loaded with that class directly: transformers' Auto classes
    import torch wherever it is installed, which a server of ONNX models must not pay for (nor run beside).
    """
    import transformers

    config = Path(source) / "tokenizer_config.json"
    tokenizer: Any = None
    if config.is_file():
        name = str(json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") or "")
        for candidate in (name, name.removesuffix("Fast"), name + "Fast"):
            cls = getattr(transformers, candidate, None) if candidate else None
            if cls is not None:
                tokenizer = cls.from_pretrained(source)
                break
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a fast (Rust) tokenizer is required, {source} has none")
    return tokenizer


def pad_inputs(
    windows: Sequence[WindowInput], pad_token_id: int, with_types: bool
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64] | None]:
    """input_ids, attention_mask and (with_types) token_type_ids as int64 [windows, longest], right-padded."""
    lengths = [len(w.input_ids) for w in windows]
    shape = (len(windows), max(lengths))
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    token_type_ids = np.zeros(shape, dtype=np.int64) if with_types else None
    for row, (window, n) in enumerate(zip(windows, lengths, strict=True)):
        input_ids[row, :n] = window.input_ids
        attention_mask[row, :n] = 1
        if token_type_ids is not None and window.token_type_ids is not None:
            token_type_ids[row, :n] = window.token_type_ids
    return input_ids, attention_mask, token_type_ids
