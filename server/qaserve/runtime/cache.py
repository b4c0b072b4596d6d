"""The response cache: answers of recent requests, an LRU bounded by bytes, keyed so a new revision never hits."""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from typing import NamedTuple

from qaserve.metrics import Metrics
from qaserve.qa import Answer, Passage, QAParams, ReadParams

# Bytes an entry holds besides its strings: the key tuple, the context digest, the resolved QAParams, the
# OrderedDict slot and the value tuples; per answer besides its text: the Answer object, a float and four ints.
# Measured with tracemalloc on CPython 3.11 (about 10% under these figures; newer versions store objects smaller).
ENTRY_OVERHEAD = 640
ANSWER_OVERHEAD = 320


class CacheKey(NamedTuple):
    """What decides an answer: the model and its weights, the resolved decoding parameters and the input.

    The context (a read request's passages, with their ids) is held only as a digest, so an entry's size does not
    grow with it. `read` is set for a read request only, so the two kinds never share an entry.
    """

    model: str
    revision: str
    params: QAParams
    question: str
    context_digest: bytes
    read: ReadParams | None = None


class CachedAnswers(NamedTuple):
    answers: tuple[Answer, ...]
    windows: int
    no_answer_score: float | None = None


def cache_key(model: str, revision: str, params: QAParams, question: str, context: str) -> CacheKey:
    """The key of one request; `params` must be resolved by the model (max_seq_len and doc_stride filled in)."""
    digest = hashlib.blake2b(context.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return CacheKey(model, revision, params, question, digest)


def read_cache_key(
    model: str, revision: str, params: QAParams, read: ReadParams, question: str, passages: tuple[Passage, ...]
) -> CacheKey:
    """The key of one read request: every passage's text and id, in order, go into the digest."""
    digest = hashlib.blake2b(digest_size=16)
    for passage in passages:
        for text in (passage.text, passage.id):
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two passage lists hash alike
            digest.update(data)
    return CacheKey(model, revision, params, question, digest.digest(), read)


def entry_bytes(key: CacheKey, answers: tuple[Answer, ...]) -> int:
    """An honest estimate of the memory an entry holds: its strings as Python stores them plus fixed overheads."""
    return (
        ENTRY_OVERHEAD
        + sys.getsizeof(key.question)
        + sum(ANSWER_OVERHEAD + sys.getsizeof(answer.answer) for answer in answers)
    )


class ResponseCache:
    """Least recently used answers within `max_bytes` (0 turns the cache off).

    Only the event loop touches it, so it needs no lock. Hits, misses and evictions count per model.
    """

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: OrderedDict[CacheKey, tuple[CachedAnswers, int]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes(self) -> int:
        """Estimated bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> CachedAnswers | None:
        """The stored answers for `key` (now the most recently used), or None."""
        if not self.enabled:
            return None
        found = self._entries.get(key)
        if found is None:
            self._metrics.response_cache_misses.labels(key.model).inc()
            return None
        self._entries.move_to_end(key)
        self._metrics.response_cache_hits.labels(key.model).inc()
        return found[0]

    def put(
        self, key: CacheKey, answers: tuple[Answer, ...], windows: int, no_answer_score: float | None = None
    ) -> None:
        """Stores answers, evicting the least recently used entries until they fit; an entry larger than the
        whole cache is not stored."""
        if not self.enabled:
            return
        size = entry_bytes(key, answers)
        if size > self.max_bytes:
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self._bytes -= previous[1]
        while self._entries and self._bytes + size > self.max_bytes:
            old_key, (_, old_size) = self._entries.popitem(last=False)
            self._bytes -= old_size
            self._metrics.response_cache_evictions.labels(old_key.model).inc()
        self._entries[key] = (CachedAnswers(answers, windows, no_answer_score), size)
        self._bytes += size
        self._metrics.response_cache_bytes.set(self._bytes)
