"""The onnx backend: ONNX Runtime on the CPU (or CUDA where onnxruntime-gpu is installed), running the
model.onnx that `qaserve export` wrote, float32 or with int8 weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnxruntime as ort

from qaserve.runtime.backends.base import Batch, Loaded, ReplicaThread, WindowInput, load_replicas
from qaserve.runtime.backends.manifest import ONNX_FILE, OnnxManifest, sha256_file
from qaserve.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

FED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("start_logits", "end_logits")
CUDA_PROVIDER = "CUDAExecutionProvider"


def _cuda_available() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def _weight_files(directory: Path) -> list[Path]:
    """model.onnx and, for models over 2 GB, its external data file."""
    return [p for p in (directory / ONNX_FILE, directory / (ONNX_FILE + ".data")) if p.is_file()]


class OnnxReplica(ReplicaThread):
    """One InferenceSession, opened and run on the replica's thread (see ReplicaThread)."""

    def __init__(self, label: str, device: str, path: Path, pad_token_id: int, threads: int) -> None:
        self._path = path
        self.session: Any = None
        self.input_names: set[str] = set()
        super().__init__(label, device, pad_token_id, threads)

    def open(self, threads: int) -> None:
        options = ort.SessionOptions()
        # One forward pass at a time per replica: its intra-op team does the work, nothing runs beside it.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Intra-op threads keep ORT's default spinning between operators: turning it off (allow_spinning 0) was
        # measured at +12.9 ms p50 over the bare int8 model at concurrency 1 (0.70x its q/s), against +1.4 ms with
        # spinning, and no better at concurrency 8 or 32 (bench.load --backends onnx, same-command runs).
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
        if self.device.startswith("cuda"):
            index = int(self.device.partition(":")[2] or 0)
            providers: list[Any] = [(CUDA_PROVIDER, {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self._path), sess_options=options, providers=providers)
        except Exception as error:  # ORT's own exception types say little more than their text
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{ONNX_FILE} could not be loaded by ONNX Runtime: {text}") from None
        inputs = [i.name for i in session.get_inputs()]
        unknown = [name for name in inputs if name not in FED_INPUTS]
        if unknown or "input_ids" not in inputs:
            raise ValueError(f"{ONNX_FILE} takes inputs {inputs}; the server feeds {', '.join(FED_INPUTS)}")
        outputs = {o.name for o in session.get_outputs()}
        if not set(OUTPUTS) <= outputs:
            raise ValueError(f"{ONNX_FILE} must output {' and '.join(OUTPUTS)}; it outputs {sorted(outputs)}")
        self.session = session
        self.input_names = set(inputs)

    def takes_token_types(self, windows: Sequence[WindowInput]) -> bool:
        return "token_type_ids" in self.input_names  # zeros where the tokenizer makes none

    def run(self, batch: Batch) -> tuple[npt.ArrayLike, npt.ArrayLike]:
        feeds = {"input_ids": batch.input_ids}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = batch.attention_mask
        if batch.token_type_ids is not None:
            feeds["token_type_ids"] = batch.token_type_ids
        start, end = self.session.run(list(OUTPUTS), feeds)
        return start, end

    def release(self) -> None:
        self.session = None


class OnnxBackend:
    name = "onnx"

    def devices(self, spec: ModelSpec) -> list[str]:
        """cpu; cuda or cuda:N with onnxruntime-gpu (one GPU per model; 'cuda' is cuda:0); auto picks cuda where
        the CUDA execution provider is installed."""
        if spec.device == "cpu":
            return ["cpu"]
        if spec.device == "auto":
            return ["cuda:0" if _cuda_available() else "cpu"]
        kind, _, index = spec.device.partition(":")
        if kind == "cuda" and (not index or index.isdigit()):
            if not _cuda_available():
                raise ValueError(f"device {spec.device!r} needs onnxruntime-gpu's {CUDA_PROVIDER}; it is not installed")
            return [f"cuda:{index or 0}"]
        raise ValueError(f"the onnx backend runs on cpu or cuda[:N], not {spec.device!r}")

    def estimate_bytes(self, spec: ModelSpec) -> int:
        """The weight files' size, once per replica (each replica holds its own session)."""
        return sum(p.stat().st_size for p in _weight_files(Path(spec.source))) * spec.replicas_per_device

    def load(self, spec: ModelSpec, *, pad_token_id: int, intra_op_threads: int) -> Loaded:
        directory = Path(spec.source)
        if not directory.is_dir():
            raise ValueError("the onnx backend loads local directories only")
        path = directory / ONNX_FILE
        if not path.is_file():
            raise ValueError(
                f"the onnx backend needs {ONNX_FILE} in the model directory; make it with `qaserve export`"
            )
        manifest = OnnxManifest.read(directory)
        if spec.dtype not in ("auto", manifest.dtype):
            raise ValueError(
                f"dtype {spec.dtype!r} does not match {ONNX_FILE}, which is {manifest.dtype} (use auto or the torch "
                "backend)"
            )
        return load_replicas(
            spec,
            self.devices(spec),
            intra_op_threads,
            lambda label, device, threads: OnnxReplica(label, device, path, pad_token_id, threads),
            lambda replicas, close: Loaded(
                backend=self.name,
                replicas=replicas,
                dtype=manifest.dtype,
                nbytes=self.estimate_bytes(spec),
                revision=sha256_file(path),
                max_positions=_max_positions(directory),
                close=close,
            ),
        )


def _max_positions(directory: Path) -> int | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    return value if isinstance(value, int) else None


BACKEND = OnnxBackend()
