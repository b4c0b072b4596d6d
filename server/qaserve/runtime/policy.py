"""The batching policy: how many replicas a model runs per device, with how many threads, and how they batch.

Chosen per device from measurement (docs/performance.md has the runs; 2-core CPU, the embedded MiniLM model):

- CPU, both backends: batching pays nothing. The int8 model in length-sorted batches of 8 ran 0.85x its
  one-window-at-a-time rate (70 vs 82 windows/s), and batches of equal-length windows on one thread ran level with
  single windows (within run-to-run noise), so a batch never takes padding on a CPU. Throughput comes from running
  windows side by side instead: one single-threaded replica per core ("lanes") gave 74-79 q/s at concurrency 8 and
  32 where one two-threaded replica batching up to 32 windows gave 54-62, and batching on those lanes cost 15% again.
  But a lone request on one lane runs on one core: the torch model's concurrency-1 p50 doubled (57-68 ms against
  35-41). So each CPU model also gets a "solo" replica with every core, which runs a lone request (every queued
  window is that request's, every lane idle), a window a pass, and no lane starts while it runs: the cores are never
  oversubscribed, a lone request gets them all (a long context's windows too: 42 ms where the bare model's one padded
  batch took 49), a loaded server keeps every lane busy. A lane's batch takes only windows of its oldest window's
  length, at most its share of the queue, so the windows of many requests spread over the lanes.
- GPU (and MPS): one replica per device that batches by a token budget (device.default_batch_tokens): a GPU keeps
  gaining from bigger batches far past where a CPU stops.

Explicit settings win: --replicas-per-device N and/or --intra-op-threads T give N replicas of T threads (by
threads_per_replica's rule where 0) and no solo replica; batching on a CPU still follows the rule above.
"""

from __future__ import annotations

from dataclasses import dataclass

from qaserve.runtime.device import cpu_cores, device_type


@dataclass(frozen=True)
class ReplicaPlan:
    """The replicas of a model on one device: intra-op threads of each lane, and of the solo replica (0: none)."""

    lanes: tuple[int, ...]
    solo: int = 0

    @property
    def count(self) -> int:
        return len(self.lanes) + (1 if self.solo else 0)


def replica_plan(device: str, replicas_per_device: int, intra_op_threads: int, cores: int = 0) -> ReplicaPlan:
    """The replicas on `device`. `replicas_per_device` and `intra_op_threads` are the settings (0: by this policy);
    `cores` defaults to the cores this process may use."""
    if device_type(device) != "cpu":
        return ReplicaPlan((1,) * (replicas_per_device or 1))
    cores = cores or cpu_cores()
    if replicas_per_device or intra_op_threads:
        count = replicas_per_device or max(1, cores // intra_op_threads)
        return ReplicaPlan((threads_per_replica(intra_op_threads, count, device, cores),) * count)
    return ReplicaPlan((1,) * cores, solo=cores if cores > 1 else 0)


def spreads_windows(device: str) -> bool:
    """Whether batches on `device` take only equal-length windows, at most a lane's share of the queue (CPU)."""
    return device_type(device) == "cpu"


def threads_per_replica(requested: int, replicas_on_device: int, device: str, cores: int = 0) -> int:
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
    return max(1, (cores or cpu_cores()) // max(1, replicas_on_device))
