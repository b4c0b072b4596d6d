"""A loaded question-answering model, whatever its backend: the tokenizer, its replicas and what they report."""

from __future__ import annotations

import copy
import json
import logging
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qaserve.qa import QAParams, Windows
from qaserve.qa.windowing import WindowSplitter, resolve_params
from qaserve.runtime.backends import Loaded, WindowInput, choose_backend, estimate_bytes, get_backend, plan_devices
from qaserve.runtime.source import is_path, resolved
from qaserve.runtime.spec import ModelSpec

log = logging.getLogger(__name__)


class QAModel:
    """Tokenizer + replicas of one model. split() may run on many threads; each replica runs on its own thread."""

    def __init__(self, spec: ModelSpec, tokenizer: Any, loaded: Loaded, tokenizer_copies: int = 2) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        # Splitters over copies of the tokenizer, for concurrent tokenizing: a call sets truncation state on its
        # Rust tokenizer, so concurrent calls on one would tokenize with each other's settings. One per tokenizing
        # thread, made at load, not by the first requests (a copy takes tens of milliseconds); more are made if
        # more threads tokenize at once.
        self._splitters: queue.SimpleQueue[WindowSplitter] = queue.SimpleQueue()
        for _ in range(max(1, tokenizer_copies)):
            self._splitters.put(WindowSplitter(copy.deepcopy(tokenizer)))
        self._loaded = loaded
        self.backend = loaded.backend
        self.replicas = list(loaded.replicas)
        self.solo = loaded.solo  # runs a lone window while the other replicas idle (runtime/policy.py)
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
            splitter = self._splitters.get_nowait()
        except queue.Empty:
            splitter = WindowSplitter(copy.deepcopy(self.tokenizer))
        try:
            return splitter.split(question, context, params)
        finally:
            self._splitters.put(splitter)

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


def load_tokenizer(source: str) -> Any:
    """The fast (Rust) tokenizer of a model directory.

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
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a fast (Rust) tokenizer is required, {source} has none")
    return tokenizer


def load_model(spec: ModelSpec, *, intra_op_threads: int = 0, tokenize_threads: int = 2) -> QAModel:
    """Loads a configured model with its backend (blocking: call off the event loop) and warms its replicas up.

    `tokenize_threads` tokenizer copies are made, one per thread that tokenizes (--tokenize-threads).
    """
    started = time.perf_counter()
    if is_path(spec.source) and not Path(spec.source).is_dir():
        raise FileNotFoundError(f"model directory {spec.source} does not exist")
    local = resolved(spec)  # a hub id becomes its snapshot in the Hugging Face cache
    source = local.source
    backend = get_backend(choose_backend(local))
    tokenizer = load_tokenizer(source)
    loaded = backend.load(local, pad_token_id=int(tokenizer.pad_token_id or 0), intra_op_threads=intra_op_threads)
    try:
        model = QAModel(spec, tokenizer, loaded, tokenizer_copies=tokenize_threads)
        if spec.warmup:
            model.warm_up()
    except BaseException:
        loaded.close()
        raise
    log.info(
        "loaded model %s from %s (%s) with %s on %s as %s, %.1f MB, in %.2fs",
        spec.name, source, model.revision, model.backend, ",".join(model.devices), model.dtype,
        model.nbytes / 1e6, time.perf_counter() - started,
    )  # fmt: skip
    return model


@dataclass(frozen=True)
class LoadPlan:
    """A model about to load: its spec with the source resolved to a directory, the devices it will load onto and
    the weight bytes it will take on each (0: unknown), known before any weights load."""

    spec: ModelSpec
    devices: tuple[str, ...]
    nbytes: int


class Loader(Protocol):
    """How the model cache loads a configured model: plan() first (for room in the cache), then load() with the
    plan's spec. Both blocking: called off the event loop."""

    def plan(self, spec: ModelSpec) -> LoadPlan: ...

    def load(self, spec: ModelSpec) -> QAModel: ...


class ModelLoader:
    """Loader of the backends with the server's thread settings: --intra-op-threads (0: by the batching policy) and
    --tokenize-threads. A hub id is resolved once per load, by plan(): the devices, the bytes and the load all read
    that one snapshot."""

    def __init__(self, intra_op_threads: int = 0, tokenize_threads: int = 2) -> None:
        self.intra_op_threads = intra_op_threads
        self.tokenize_threads = tokenize_threads

    def plan(self, spec: ModelSpec) -> LoadPlan:
        local = resolved(spec)  # a hub id becomes its snapshot in the Hugging Face cache
        nbytes = estimate_bytes(local, intra_op_threads=self.intra_op_threads)  # the replicas load() will make
        return LoadPlan(local, tuple(plan_devices(local)), nbytes)

    def load(self, spec: ModelSpec) -> QAModel:
        return load_model(spec, intra_op_threads=self.intra_op_threads, tokenize_threads=self.tokenize_threads)
