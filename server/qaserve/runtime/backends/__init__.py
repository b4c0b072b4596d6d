"""Backends turn a model directory into replicas that run forward passes; BACKENDS names every one of them."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from qaserve.runtime.backends.base import (
    Backend,
    Batch,
    Loaded,
    ReplicaThread,
    WindowInput,
    WindowLogits,
    load_replicas,
)
from qaserve.runtime.backends.manifest import MANIFEST_FILE, ONNX_FILE, OnnxManifest, find_onnx
from qaserve.runtime.device import accelerator_possible
from qaserve.runtime.policy import threads_per_replica
from qaserve.runtime.source import resolved
from qaserve.runtime.spec import ModelSpec


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives: the module whose BACKEND implements it, and the distribution of its framework."""

    module: str
    distribution: str  # reported by qaserve_build_info ("" where none)
    missing: str = ""  # what a server without the framework says when a model needs it


# The one table of backends: the settings' choices, auto's candidates and the build-info metric read it.
# A backend is one module (see base.py) plus one line here plus, for its framework, one extra in server/pyproject.
BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry(
        "qaserve.runtime.backends.torch",
        "torch",
        "no ONNX file here and no torch to run the checkpoint: export it where torch is (qaserve[torch] or the export "
        "image): `qaserve export DIR OUT --quantize int8`, then serve OUT",
    ),
    "onnx": BackendEntry(
        "qaserve.runtime.backends.onnx",
        "onnxruntime",
        "the onnx backend needs ONNX Runtime: pip install 'qaserve[cpu]' (or 'qaserve[cuda]' for NVIDIA GPUs)",
    ),
}
AUTO = "auto"


def backend_choices() -> tuple[str, ...]:
    """What a model's backend may be set to: auto or a backend's name."""
    return (AUTO, *BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called `name`; importing its module is what imports its framework."""
    entry = BACKENDS.get(name)
    if entry is None:
        raise ValueError(f"unknown backend {name!r}; choose {', '.join(backend_choices())}")
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as error:
        if error.name != entry.distribution or not entry.missing:
            raise
        raise ValueError(entry.missing) from None
    backend: Backend = module.BACKEND
    return backend


def choose_backend(spec: ModelSpec) -> str:
    """The backend of a model whose source is a directory. auto: onnx where the directory holds an ONNX file (see
    ONNX_LAYOUTS) and the model runs on the CPU, torch otherwise (GPUs, and exact parity with the transformers
    pipeline)."""
    if spec.backend != AUTO and spec.backend not in BACKENDS:
        raise ValueError(
            f"model {spec.name!r}: backend must be one of {', '.join(backend_choices())}, got {spec.backend!r}"
        )
    if spec.backend != AUTO:
        return spec.backend
    if find_onnx(Path(spec.source)) is None:
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
    """The devices a model will load onto, before it loads (for the model cache's byte budget). Blocking: a hub
    id is resolved to its snapshot in the Hugging Face cache (see source.resolved); the model cache passes specs
    resolved already (model.ModelLoader)."""
    local = resolved(spec)
    return get_backend(choose_backend(local)).devices(local)


def estimate_bytes(spec: ModelSpec, intra_op_threads: int = 0) -> int:
    """Weight bytes a model will take per device, read from file headers (no weights loaded); 0 when unknown.
    `intra_op_threads` is the load's (--intra-op-threads). Blocking, as plan_devices."""
    local = resolved(spec)
    return get_backend(choose_backend(local)).estimate_bytes(local, intra_op_threads=intra_op_threads)


__all__ = [
    "AUTO",
    "BACKENDS",
    "MANIFEST_FILE",
    "ONNX_FILE",
    "Backend",
    "BackendEntry",
    "Batch",
    "Loaded",
    "OnnxManifest",
    "ReplicaThread",
    "WindowInput",
    "WindowLogits",
    "backend_choices",
    "choose_backend",
    "estimate_bytes",
    "get_backend",
    "load_replicas",
    "plan_devices",
    "threads_per_replica",
]
