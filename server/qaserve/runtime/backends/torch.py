"""The torch backend: transformers' AutoModelForQuestionAnswering on CPU, CUDA or MPS in fp32/fp16/bf16, with
exactly the logits the transformers pipeline sees."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import numpy.typing as npt
import torch

from qaserve.runtime.backends.base import Batch, Loaded, ReplicaThread, load_replicas
from qaserve.runtime.backends.manifest import weights_revision
from qaserve.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Bytes per element of the safetensors header's dtype names, for estimates without loading.
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


# Pickled weights run code when loaded; qaserve loads safetensors only. The conversion is one line, run once.
BIN_ONLY = (
    'weights only in pytorch_model.bin (a pickle, not loaded): convert them once with python -c "import transformers '
    "as t; t.AutoModelForQuestionAnswering.from_pretrained('DIR').save_pretrained('DIR')\""
)


def accelerator_available() -> bool:
    """Whether torch sees a CUDA or MPS device."""
    return bool(torch.cuda.is_available() or torch.backends.mps.is_available())


def resolve_device(spec: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> a device that exists on this machine."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unsupported device {spec!r}") from None
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


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA/MPS and float32 on CPU (half precision is slow or unsupported on most CPUs)."""
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if spec not in DTYPES:
        raise ValueError(f"unsupported dtype {spec!r} for the torch backend; choose auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


class TorchReplica(ReplicaThread):
    """The model on one device, loaded, warmed up and run on the replica's thread (see ReplicaThread)."""

    def __init__(
        self,
        label: str,
        device: torch.device,
        pad_token_id: int,
        threads: int,
        weights: Callable[[torch.device], torch.nn.Module],
    ) -> None:
        """`weights(device)` gives the model on `device`; it runs on the replica's thread."""
        self._device = device
        self._weights = weights
        self.module: torch.nn.Module | None = None
        super().__init__(label, str(device), pad_token_id, threads)

    def open(self, threads: int) -> None:
        # A thread's first torch call sizes its OpenMP team from the process-wide setting (the last replica's), undoing
        # any size set before it: so that first call happens here, then this replica's own size holds for good.
        torch.get_num_threads()
        torch.set_num_threads(threads)
        self.module = self._weights(self._device)

    def run(self, batch: Batch) -> tuple[npt.ArrayLike, npt.ArrayLike]:
        assert self.module is not None, "replica closed"
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.token_type_ids is not None:
            inputs["token_type_ids"] = batch.token_type_ids
        with torch.inference_mode():
            output = self.module(
                **{k: torch.from_numpy(v).to(self._device, non_blocking=True) for k, v in inputs.items()}
            )
            return output.start_logits.float().cpu().numpy(), output.end_logits.float().cpu().numpy()

    def release(self) -> None:
        self.module = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


class TorchBackend:
    name = "torch"

    def devices(self, spec: ModelSpec) -> list[str]:
        if spec.device == "cpu":
            return ["cpu"]
        return [str(d) for d in replica_devices(spec.device)]

    def estimate_bytes(self, spec: ModelSpec, *, intra_op_threads: int) -> int:
        """From the safetensors header (no weights read), at the dtype the model will load as; replicas on one
        device share its weights, so threads do not count."""
        path = Path(spec.source) / "model.safetensors"
        if not path.is_file():
            return 0
        device = torch.device("cpu") if spec.device == "cpu" else replica_devices(spec.device)[0]
        element = torch.empty((), dtype=resolve_dtype(spec.dtype, device)).element_size()
        total = 0
        for shape, kind in _safetensors_shapes(path):
            numel = 1
            for dim in shape:
                numel *= dim
            # Floating-point weights load at the model's dtype; integer buffers keep their size.
            total += numel * (element if kind.startswith(("F", "BF")) else SAFETENSORS_BYTES.get(kind, 4))
        return total

    def load(self, spec: ModelSpec, *, pad_token_id: int, intra_op_threads: int) -> Loaded:
        """Loads safetensors weights; a checkpoint with pickled weights only gets the line that converts it."""
        directory = Path(spec.source)
        if not any(directory.glob("*.safetensors")) and any(directory.glob("pytorch_model*.bin")):
            raise ValueError(BIN_ONLY)
        devices = replica_devices(spec.device)
        dtype = resolve_dtype(spec.dtype, devices[0])
        local = Path(spec.source).is_dir()
        revision = None if local else spec.revision
        modules: dict[torch.device, torch.nn.Module] = {}

        def weights(device: torch.device) -> torch.nn.Module:
            if device not in modules:  # replicas on one device share its weights
                modules[device] = _from_pretrained(spec.source, revision, dtype, device)
            return modules[device]

        def describe(replicas: list[TorchReplica], close: Callable[[], None]) -> Loaded:
            module = replicas[0].module
            assert module is not None
            nbytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            config = module.config
            max_positions = getattr(config, "max_position_embeddings", None)
            return Loaded(
                backend=self.name,
                replicas=replicas,
                dtype=str(dtype).removeprefix("torch."),
                nbytes=nbytes,
                revision=weights_revision(spec.source, local, config),
                max_positions=int(max_positions) if isinstance(max_positions, int) else None,
                close=close,
            )

        return load_replicas(
            spec,
            devices,
            intra_op_threads,
            lambda label, device, threads: TorchReplica(label, device, pad_token_id, threads, weights),
            describe,
        )


def _from_pretrained(source: str, revision: str | None, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The transformers model, in eval mode, on `device`."""
    from transformers import AutoModelForQuestionAnswering

    module = AutoModelForQuestionAnswering.from_pretrained(
        source, revision=revision, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    loaded: torch.nn.Module = module.eval().to(device)
    return loaded


def _safetensors_shapes(path: Path) -> list[tuple[list[int], str]]:
    """(shape, dtype name) of every tensor in a safetensors file, from its JSON header."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return [(list(v["shape"]), str(v["dtype"])) for k, v in header.items() if k != "__metadata__"]


BACKEND = TorchBackend()
