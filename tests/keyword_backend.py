"""A backend written in the tests, as a new backend is written: one module on the backend contract. Its logits
point at the model directory's keyword (keyword.txt), so its answers are known in advance."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from qaserve.runtime.backends import Batch, Loaded, ReplicaThread, load_replicas
from qaserve.runtime.model import load_tokenizer
from qaserve.runtime.spec import ModelSpec

KEYWORD_FILE = "keyword.txt"


class KeywordReplica(ReplicaThread):
    """Scores the keyword's tokens high, everything else 0."""

    def __init__(self, label: str, device: str, pad_token_id: int, threads: int, keyword_ids: list[int]) -> None:
        self.keyword_ids = keyword_ids
        self.threads = 0
        self.thread_names: list[str] = []  # the threads open, run and release ran on
        self.opened = False
        super().__init__(label, device, pad_token_id, threads)

    def open(self, threads: int) -> None:
        self.thread_names.append(threading.current_thread().name)
        if not self.keyword_ids:
            raise ValueError(f"{KEYWORD_FILE} is empty")
        self.threads = threads
        self.opened = True

    def run(self, batch: Batch) -> tuple[npt.ArrayLike, npt.ArrayLike]:
        self.thread_names.append(threading.current_thread().name)
        hits = np.isin(batch.input_ids, self.keyword_ids).astype(np.float32) * 10.0
        return hits, hits

    def release(self) -> None:
        self.thread_names.append(threading.current_thread().name)
        self.opened = False


class KeywordBackend:
    name = "keyword"

    def devices(self, spec: ModelSpec) -> list[str]:
        return ["cpu"]

    def estimate_bytes(self, spec: ModelSpec, *, intra_op_threads: int) -> int:
        return 0

    def load(self, spec: ModelSpec, *, pad_token_id: int, intra_op_threads: int) -> Loaded:
        keyword = (Path(spec.source) / KEYWORD_FILE).read_text(encoding="utf-8").strip()
        ids = load_tokenizer(spec.source)(keyword, add_special_tokens=False)["input_ids"] if keyword else []
        return load_replicas(
            spec,
            self.devices(spec),
            intra_op_threads,
            lambda label, device, threads: KeywordReplica(label, device, pad_token_id, threads, ids),
            lambda replicas, close: Loaded(
                backend=self.name,
                replicas=replicas,
                dtype="float32",
                nbytes=0,
                revision=f"keyword:{keyword}",
                max_positions=None,
                close=close,
            ),
        )


BACKEND = KeywordBackend()
