"""The backend contract: what a backend makes of a model, and the replica thread every backend's replicas run on."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from qaserve.runtime.batcher import Replica
from qaserve.runtime.policy import replica_plan
from qaserve.runtime.spec import ModelSpec

Logits = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class WindowInput:
    """One window's model inputs, as queued for a batch."""

    input_ids: list[int]
    token_type_ids: list[int] | None


@dataclass(frozen=True)
class WindowLogits:
    """One window's start and end logits: numpy float32, trimmed to the window's length."""

    start: Logits
    end: Logits


@dataclass(frozen=True)
class Batch:
    """A batch of windows as a model takes it: int64 [windows, longest], right-padded."""

    input_ids: Int64Array
    attention_mask: Int64Array
    token_type_ids: Int64Array | None  # None where the replica takes none


@dataclass
class Loaded:
    """What a backend made of a model: replicas ready to run, and what they report."""

    backend: str  # its name in the BACKENDS table
    replicas: Sequence[Replica[WindowInput, WindowLogits]]  # every replica, the solo one included
    dtype: str  # float32, float16, bfloat16, int8
    nbytes: int  # weight bytes held per device
    revision: str  # sha256:<hex> of the weights file, or the hub commit
    max_positions: int | None  # the model config's max_position_embeddings, where it records one
    close: Callable[[], None]  # frees the replicas (on their own threads) and their device memory
    # The replica with every core that runs a lone request while the others idle (policy.py); load_replicas sets it.
    solo: Replica[WindowInput, WindowLogits] | None = None


class Backend(Protocol):
    """One inference framework. Its module is imported, and with it its framework, only where a model uses it."""

    name: str

    def devices(self, spec: ModelSpec) -> list[str]:
        """The devices the model's replicas will run on (e.g. ["cpu"], ["cuda:0", "cuda:1"])."""
        ...

    def estimate_bytes(self, spec: ModelSpec, *, intra_op_threads: int) -> int:
        """Weight bytes the model will take per device, without loading it; 0 when unknown. `intra_op_threads` is
        load()'s, for backends whose replicas each hold their own weights (their count follows the plan)."""
        ...

    def load(self, spec: ModelSpec, *, pad_token_id: int, intra_op_threads: int) -> Loaded:
        """Loads the weights into replicas, each on its own thread (blocking: call off the event loop).
        `intra_op_threads` is the --intra-op-threads setting (0 = by the batching policy, policy.replica_plan);
        load_replicas makes the replicas with it."""
        ...


class ReplicaThread(abc.ABC):
    """A model on one device with the single thread that opens it, runs its forward passes and closes it: the
    framework runs on no other thread, so no second thread team competes for the cores.

    A backend writes open() (load onto the device, with `threads` intra-op threads), run() (one forward pass over a
    padded batch) and release() (drop what open() loaded); the thread, its start and stop, clean-up when opening
    fails, padding and trimming the logits to each window are done here.
    """

    def __init__(self, label: str, device: str, pad_token_id: int, threads: int) -> None:
        self.label = label
        self.device = device
        self.threads = threads  # intra-op threads of its forward passes
        self.pad_token_id = pad_token_id
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{label}")
        try:
            self.executor.submit(self.open, threads).result()
        except BaseException:
            self.executor.shutdown(wait=True)
            raise

    @abc.abstractmethod
    def open(self, threads: int) -> None:
        """Loads the model onto the device for forward passes with `threads` intra-op threads; on the replica's
        thread."""

    @abc.abstractmethod
    def run(self, batch: Batch) -> tuple[npt.ArrayLike, npt.ArrayLike]:
        """One forward pass: start and end logits, [windows, longest]; on the replica's thread."""

    @abc.abstractmethod
    def release(self) -> None:
        """Drops the model and frees its device memory; on the replica's thread."""

    def takes_token_types(self, windows: Sequence[WindowInput]) -> bool:
        """Whether the batch carries token_type_ids: where the tokenizer made them."""
        return windows[0].token_type_ids is not None

    def forward(self, windows: list[WindowInput]) -> list[WindowLogits]:
        """One forward pass over a padded batch of windows, logits trimmed to each window; on the replica's
        thread."""
        start, end = self.run(pad_inputs(windows, self.pad_token_id, self.takes_token_types(windows)))
        starts = np.asarray(start, dtype=np.float32)
        ends = np.asarray(end, dtype=np.float32)
        return [WindowLogits(starts[row, :n], ends[row, :n]) for row, n in enumerate(len(w.input_ids) for w in windows)]

    def close(self) -> None:
        """Releases the model on the replica's thread, then stops the thread."""
        self.executor.submit(self.release).result()
        self.executor.shutdown(wait=True)


def pad_inputs(windows: Sequence[WindowInput], pad_token_id: int, with_types: bool) -> Batch:
    """input_ids, attention_mask and (with_types) token_type_ids as int64 [windows, longest], right-padded."""
    lengths = [len(w.input_ids) for w in windows]
    shape = (len(windows), max(lengths))
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    token_type_ids = np.zeros(shape, dtype=np.int64) if with_types else None
    for row, (window, n) in enumerate(zip(windows, lengths, strict=True)):
        input_ids[row, :n] = window.input_ids
        attention_mask[row, :n] = 1
        if token_type_ids is not None and window.token_type_ids is not None:
            token_type_ids[row, :n] = window.token_type_ids
    return Batch(input_ids, attention_mask, token_type_ids)


R = TypeVar("R", bound=ReplicaThread)
D = TypeVar("D")


def load_replicas(
    spec: ModelSpec,
    devices: Sequence[D],
    intra_op_threads: int,
    make: Callable[[str, D, int], R],
    describe: Callable[[list[R], Callable[[], None]], Loaded],
) -> Loaded:
    """The replicas the batching policy plans on each device (policy.replica_plan), made in turn by
    `make(label, device, threads)`, then `describe(replicas, close)`: what they loaded, with the solo replica set.
    On any failure the replicas made so far are closed."""
    replicas: list[R] = []
    solo: R | None = None

    def close() -> None:
        for replica in replicas:
            replica.close()
        replicas.clear()

    try:
        for device in devices:
            plan = replica_plan(str(device), spec.replicas_per_device, intra_op_threads)
            for i, threads in enumerate(plan.lanes):
                replicas.append(make(f"{spec.name}-{device}-{i}", device, threads))
            if plan.solo:
                solo = make(f"{spec.name}-{device}-solo", device, plan.solo)
                replicas.append(solo)
        loaded = describe(list(replicas), close)
        loaded.solo = solo
        return loaded
    except BaseException:
        close()
        raise
