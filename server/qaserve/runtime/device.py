"""Device and dtype resolution: auto picks cuda, then mps, then cpu; half precision on accelerators."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> a device that exists on this machine."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {spec!r}")
    return device


def replica_devices(spec: str) -> list[torch.device]:
    """Devices to run replicas on: every visible GPU for 'cuda' (or 'auto' with CUDA), else the one device."""
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [resolve_device(spec)]


def default_batch_tokens(device: torch.device) -> int:
    """Padded tokens per forward pass worth batching. A CPU is compute-bound: batching short windows amortises
    per-call overhead, but past about a thousand tokens it only adds latency (measured with bench/load.py on
    2 cores); accelerators keep gaining far longer."""
    return 1024 if device.type == "cpu" else 65536


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA/MPS and float32 on CPU (half precision is slow or unsupported on most CPUs)."""
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if spec not in DTYPES:
        raise ValueError(f"unsupported dtype {spec!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[spec]
