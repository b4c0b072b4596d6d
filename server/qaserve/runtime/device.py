"""Device facts that need no framework: CPU cores, whether an accelerator can exist, batch sizes by device."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path


def device_type(device: str) -> str:
    """'cuda:1' -> 'cuda'; 'cpu' -> 'cpu'."""
    return device.split(":", 1)[0]


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def accelerator_possible() -> bool:
    """Whether torch could find a GPU here, decided without importing torch where the answer is surely no:
    torch not installed, a CPU-only torch build, or no GPU driver (NVIDIA or AMD) on a non-Apple machine."""
    if sys.modules.get("torch") is not None:
        return True  # already imported: asking it costs nothing more
    if importlib.util.find_spec("torch") is None:
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version("torch").endswith("+cpu"):
            return False
    except PackageNotFoundError:
        pass
    if sys.platform == "darwin":
        return platform.machine() == "arm64"  # MPS
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd"))


def default_batch_tokens(device: str) -> int:
    """Padded tokens per forward pass worth batching. A CPU is compute-bound: batching short windows amortises
    per-call overhead, but past about a thousand tokens it only adds latency (measured with bench/load.py on
    2 cores); accelerators keep gaining far longer."""
    return 1024 if device_type(device) == "cpu" else 65536
