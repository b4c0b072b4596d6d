"""What a configured model is: its name, source and how to run it (the runtime never reads settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A configured model: where its weights come from and how to run them, every value resolved (the defaults
    here are the server settings' defaults, for models made in code)."""

    name: str
    source: str  # a local directory, or a hub id where the network allows
    revision: str | None = None  # hub revision (branch, tag or commit); ignored for directories
    # auto: onnx where the directory holds model.onnx and the device is cpu, torch otherwise; or torch, onnx
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    replicas_per_device: int = 0  # 0: by the batching policy (runtime/policy.py)
    pinned: bool = False  # never evicted nor unloaded
    preload: bool = False  # loaded at start, before the server reports SERVING
    warmup: bool = True  # one forward pass per replica at load, so the first request is not the slow one
    # Batching: the models file's values, or the server's settings where it sets none (config fills them in).
    max_batch_windows: int = 32  # most windows per forward pass
    max_batch_tokens: int = 0  # most padded tokens per forward pass; 0 = the device's default
    max_wait_ms: float = 2.0  # longest a free replica waits for windows still being tokenized
    # Requests of this model admitted at once, within the server's bound; None: no limit of its own.
    max_in_flight: int | None = None
    # Request parameter defaults for requests that leave them unset; None = the transformers pipeline's.
    max_seq_len: int | None = None
    doc_stride: int | None = None
    max_answer_len: int | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class ModelsConfig:
    """The models a server may serve, and how many of them fit in memory at once."""

    models: tuple[ModelSpec, ...]
    default: str
    max_models: int = 4
    max_bytes_per_device: int = 0  # 0 = no byte budget
