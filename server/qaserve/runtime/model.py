"""A loaded question-answering model: tokenizer, weights and one forward replica per device."""

from __future__ import annotations

import copy
import hashlib
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qaserve.qa import QAParams, Windows, split_into_windows
from qaserve.qa.windowing import resolve_params
from qaserve.runtime.device import replica_devices, resolve_dtype
from qaserve.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_COPIES = 2  # the default --tokenize-threads


@dataclass(frozen=True)
class WindowInput:
    """One window's model inputs, as queued for a batch."""

    input_ids: list[int]
    token_type_ids: list[int] | None


@dataclass(frozen=True)
class WindowLogits:
    """One window's start and end logits (float32, CPU, trimmed to the window's length)."""

    start: torch.Tensor
    end: torch.Tensor


class Replica:
    """The model on one device, with the single thread that runs its forward passes."""

    def __init__(self, module: torch.nn.Module, device: torch.device, pad_token_id: int, label: str) -> None:
        self.module = module
        self.device = device
        self.pad_token_id = pad_token_id
        self.label = label
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{label}")

    def forward(self, windows: list[WindowInput]) -> list[WindowLogits]:
        """One forward pass over a padded batch of windows; runs on the replica's thread."""
        lengths = [len(w.input_ids) for w in windows]
        width = max(lengths)
        input_ids = torch.full((len(windows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
        with_types = windows[0].token_type_ids is not None
        token_type_ids = torch.zeros((len(windows), width), dtype=torch.long) if with_types else None
        for row, (window, n) in enumerate(zip(windows, lengths, strict=True)):
            input_ids[row, :n] = torch.tensor(window.input_ids)
            attention_mask[row, :n] = 1
            if token_type_ids is not None and window.token_type_ids is not None:
                token_type_ids[row, :n] = torch.tensor(window.token_type_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        with torch.inference_mode():
            output = self.module(**{k: v.to(self.device, non_blocking=True) for k, v in inputs.items()})
            start = output.start_logits.float().cpu()
            end = output.end_logits.float().cpu()
        return [WindowLogits(start[row, :n], end[row, :n]) for row, n in enumerate(lengths)]

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class QAModel:
    """Tokenizer + replicas of one model. split() may run on many threads; each replica runs on its own thread."""

    def __init__(self, spec: ModelSpec, tokenizer: Any, replicas: list[Replica], revision: str, dtype: torch.dtype):
        self.spec = spec
        self.tokenizer = tokenizer
        # Copies for concurrent tokenizing: a call sets truncation state on the shared Rust tokenizer, so
        # concurrent calls on one instance would tokenize with each other's settings. Made at load, not on the
        # first requests (a copy takes tens of milliseconds); more are made if more threads tokenize at once.
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(TOKENIZER_COPIES):
            self._tokenizers.put(copy.deepcopy(tokenizer))
        self.replicas = replicas
        self.revision = revision
        self.dtype = dtype
        limit = int(tokenizer.model_max_length)
        config_limit = getattr(replicas[0].module.config, "max_position_embeddings", None)
        if limit > 1_000_000 and config_limit:  # tokenizers without a recorded limit report a huge sentinel
            limit = int(config_limit)
        self.max_seq_len = limit
        self.nbytes = sum(
            t.numel() * t.element_size() for t in (*replicas[0].module.parameters(), *replicas[0].module.buffers())
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def devices(self) -> list[str]:
        return sorted({str(r.device) for r in self.replicas})

    @classmethod
    def load(cls, spec: ModelSpec) -> QAModel:
        """Loads tokenizer and weights (blocking: call off the event loop) and warms every replica up."""
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        started = time.perf_counter()
        source = spec.source
        local = Path(source).is_dir()
        if not local and source.startswith(("/", "./", "../", "~")):
            raise FileNotFoundError(f"model directory {source} does not exist")
        revision = None if local else spec.revision
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"model {spec.name!r}: a fast (Rust) tokenizer is required, {source} has none")
        replicas: list[Replica] = []
        devices = replica_devices(spec.device)
        dtype = resolve_dtype(spec.dtype, devices[0])
        for device in devices:
            module = AutoModelForQuestionAnswering.from_pretrained(
                source, revision=revision, dtype=dtype, trust_remote_code=False
            )
            module.eval().to(device)
            for i in range(spec.replicas_per_device):
                replicas.append(Replica(module, device, int(tokenizer.pad_token_id or 0), f"{spec.name}-{device}-{i}"))
        model = cls(spec, tokenizer, replicas, _revision(source, local, replicas[0].module), dtype)
        if spec.warmup:
            model.warm_up()
        log.info(
            "loaded model %s from %s (%s) on %s as %s, %.1f MB, in %.2fs",
            spec.name, source, model.revision, ",".join(model.devices), str(dtype).removeprefix("torch."),
            model.nbytes / 1e6, time.perf_counter() - started,
        )  # fmt: skip
        return model

    def resolve(self, params: QAParams) -> QAParams:
        """Fills model-dependent defaults and checks model-dependent ranges."""
        return resolve_params(params, self.max_seq_len)

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
        for replica in self.replicas:
            replica.close()
        self.replicas.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def estimate_bytes(spec: ModelSpec) -> int:
    """Parameter bytes the model will take per device, from the safetensors header (no weights read);
    0 when unknown (a hub id, or weights in another format)."""
    path = Path(spec.source) / "model.safetensors"
    if not path.is_file():
        return 0
    from safetensors import safe_open

    element = torch.empty((), dtype=resolve_dtype(spec.dtype, replica_devices(spec.device)[0])).element_size()
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            numel = 1
            for dim in f.get_slice(key).get_shape():
                numel *= dim
            total += numel * element
    return total


def _revision(source: str, local: bool, module: torch.nn.Module) -> str:
    """sha256 of the weights for a directory; the resolved commit for a hub model."""
    if local:
        for name in WEIGHT_FILES:
            path = Path(source) / name
            if path.is_file():
                digest = hashlib.sha256()
                with path.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                return f"sha256:{digest.hexdigest()}"
        return "local"
    return str(getattr(module.config, "_commit_hash", None) or "unknown")
