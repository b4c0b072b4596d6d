"""Backends turn a model directory into replicas that run forward passes: torch or ONNX Runtime, chosen per model."""

from __future__ import annotations

import functools
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from qaserve.runtime.backends.manifest import MANIFEST_FILE, ONNX_FILE, OnnxManifest
from qaserve.runtime.device import accelerator_possible, cpu_cores, device_type
from qaserve.runtime.model import Loaded, QAModel, load_tokenizer
from qaserve.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

D = TypeVar("D")

BACKENDS = ("torch", "onnx")
CHOICES = ("auto", *BACKENDS)


class Backend(Protocol):
    """One inference framework. Its framework is imported only where a model uses it."""

    name: str

    def devices(self, spec: ModelSpec) -> list[str]:
        """The devices the model's replicas will run on (e.g. ["cpu"], ["cuda:0", "cuda:1"])."""
        ...

    def estimate_bytes(self, spec: ModelSpec) -> int:
        """Weight bytes the model will take per device, without loading it; 0 when unknown."""
        ...

    def load(self, spec: ModelSpec, *, pad_token_id: int, intra_op_threads: int) -> Loaded:
        """Loads the weights into replicas, each on its own thread (blocking: call off the event loop).
        `intra_op_threads` is the --intra-op-threads setting (0 = by rule, see threads_per_replica)."""
        ...


def get_backend(name: str) -> Backend:
    """The backend called `name`; importing its module is what imports its framework."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose {', '.join(CHOICES)}")
    module = importlib.import_module(f"qaserve.runtime.backends.{name}")
    backend: Backend = module.BACKEND
    return backend


def choose_backend(spec: ModelSpec) -> str:
    """torch or onnx for a model. auto: onnx where the directory holds model.onnx and the model runs on the
    CPU, torch otherwise (GPUs, and exact parity with the transformers pipeline)."""
    if spec.backend not in CHOICES:
        raise ValueError(f"model {spec.name!r}: backend must be one of {', '.join(CHOICES)}, got {spec.backend!r}")
    if spec.backend != "auto":
        return spec.backend
    if not (Path(spec.source) / ONNX_FILE).is_file():
        return "torch"
    if spec.device == "cpu":
        return "onnx"
    if spec.device == "auto":
        if not accelerator_possible():
            return "onnx"
        from qaserve.runtime.backends.torch import accelerator_available

        return "torch" if accelerator_available() else "onnx"
    return "torch"


def plan_devices(spec: ModelSpec) -> list[str]:
    """The devices a model will load onto, before it loads (for the model cache's byte budget)."""
    return get_backend(choose_backend(spec)).devices(spec)


def estimate_bytes(spec: ModelSpec) -> int:
    """Weight bytes a model will take per device, read from file headers (no weights loaded); 0 when unknown."""
    return get_backend(choose_backend(spec)).estimate_bytes(spec)


def threads_per_replica(requested: int, replicas_on_device: int, device: str) -> int:
    """Intra-op threads of one replica's forward passes (torch's set_num_threads, ONNX Runtime's
    intra_op_num_threads).

    `requested` > 0 (--intra-op-threads) is used as it is. Otherwise a CPU's cores are split between the model's
    replicas on it: cores // replicas, at least 1. A replica runs one forward pass at a time on its own thread, so
    its thread team plus the others' fill the cores without two teams spinning on one core (that costs ~40% per
    forward on 2 cores). Tokenizing and decoding are not subtracted: they are a few percent of a request's time.
    Models busy at the same time each size their teams this way, so several busy CPU models share the cores.
    A GPU replica gets 1: its CPU side only launches kernels.
    """
    if requested > 0:
        return requested
    if device_type(device) != "cpu":
        return 1
    return max(1, cpu_cores() // max(1, replicas_on_device))


class _Closable(Protocol):
    def close(self) -> None: ...


R = TypeVar("R", bound=_Closable)


def load_replicas(
    spec: ModelSpec,
    devices: Sequence[D],
    intra_op_threads: int,
    make: Callable[[str, D, int], R],
    describe: Callable[[list[R], Callable[[], None]], Loaded],
) -> Loaded:
    """spec.replicas_per_device replicas on each device, made in turn by `make(label, device, threads)`, then
    `describe(replicas, close)`: what they loaded. On any failure the replicas made so far are closed."""
    replicas: list[R] = []

    def close() -> None:
        for replica in replicas:
            replica.close()
        replicas.clear()

    try:
        for device in devices:
            threads = threads_per_replica(intra_op_threads, spec.replicas_per_device, str(device))
            for i in range(spec.replicas_per_device):
                replicas.append(make(f"{spec.name}-{device}-{i}", device, threads))
        return describe(list(replicas), close)
    except BaseException:
        close()
        raise


def load_model(spec: ModelSpec, *, intra_op_threads: int = 0, tokenize_threads: int = 2) -> QAModel:
    """Loads a configured model with its backend (blocking: call off the event loop) and warms its replicas up.

    `tokenize_threads` tokenizer copies are made, one per thread that tokenizes (--tokenize-threads).
    """
    started = time.perf_counter()
    source = spec.source
    local = Path(source).is_dir()
    if not local and source.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model directory {source} does not exist")
    backend = get_backend(choose_backend(spec))
    tokenizer = load_tokenizer(source, None if local else spec.revision)
    loaded = backend.load(spec, pad_token_id=int(tokenizer.pad_token_id or 0), intra_op_threads=intra_op_threads)
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


def model_loader(intra_op_threads: int = 0, tokenize_threads: int = 2) -> Callable[[ModelSpec], QAModel]:
    """load_model with the server's thread settings, for ModelRegistry(loader=...)."""
    return functools.partial(load_model, intra_op_threads=intra_op_threads, tokenize_threads=tokenize_threads)


__all__ = [
    "BACKENDS",
    "CHOICES",
    "MANIFEST_FILE",
    "ONNX_FILE",
    "Backend",
    "OnnxManifest",
    "choose_backend",
    "estimate_bytes",
    "get_backend",
    "load_model",
    "load_replicas",
    "model_loader",
    "plan_devices",
    "threads_per_replica",
]
