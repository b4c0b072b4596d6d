"""The onnx backend: ONNX Runtime on the CPU (or CUDA with onnxruntime-gpu), running a question-answering model's
ONNX file (`qaserve export`'s, Optimum's, or a hub repository's onnx/model.onnx), float32 or with int8 weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnxruntime as ort

from qaserve.errors import first_line
from qaserve.runtime.backends.base import Batch, Loaded, ReplicaThread, WindowInput, load_replicas
from qaserve.runtime.backends.manifest import ONNX_LAYOUTS, find_onnx, sha256_file
from qaserve.runtime.policy import replica_plan
from qaserve.runtime.spec import ModelSpec

log = logging.getLogger(__name__)

FED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("start_logits", "end_logits")
CUDA_PROVIDER = "CUDAExecutionProvider"
# Operators that only a quantized graph holds: ONNX Runtime's dynamic and static int8 quantization write them.
QUANTIZED_OPS = frozenset(
    {
        "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger",
        "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
        "QGemm", "DynamicQuantizeLSTM",
    }
)  # fmt: skip


def _cuda_available() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def _weight_files(path: Path) -> list[Path]:
    """The ONNX file and, for models over 2 GB, its external data file (named as torch or Optimum name it)."""
    return [p for p in (path, path.with_name(path.name + ".data"), path.with_name(path.name + "_data")) if p.is_file()]


def _weights_size(path: Path) -> int:
    return sum(p.stat().st_size for p in _weight_files(path))


def graph_dtype(path: Path) -> str:
    """int8 where the graph holds quantized operators, float16 where its weights are half precision, else
    float32: what the server reports, read from the graph (not its weights) in any layout."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # protobuf's decode errors, onnx's own: their first line says what is wrong
        raise ValueError(f"{path.name} could not be read as an ONNX model: {first_line(error)}") from None
    ops = {node.op_type for node in graph.node}
    if ops & QUANTIZED_OPS:
        return "int8"
    if any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in graph.initializer):
        return "float16"
    return "float32"


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
            # The CUDA and cuDNN libraries of the nvidia-* wheels (the cuda extra) are not on the loader's path:
            # onnxruntime-gpu loads them from there itself.
            ort.preload_dlls()
            index = int(self.device.partition(":")[2] or 0)
            providers: list[Any] = [(CUDA_PROVIDER, {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self._path), sess_options=options, providers=providers)
        except Exception as error:  # ORT's own exception types say little more than their text
            raise ValueError(f"{self._path.name} could not be loaded by ONNX Runtime: {first_line(error)}") from None
        inputs = [i.name for i in session.get_inputs()]
        unknown = [name for name in inputs if name not in FED_INPUTS]
        if unknown or "input_ids" not in inputs:
            raise ValueError(
                f"not a question-answering model: {self._path.name} takes inputs {inputs}; a QA model takes "
                f"input_ids and any of {', '.join(FED_INPUTS[1:])}"
            )
        outputs = [o.name for o in session.get_outputs()]
        if not set(OUTPUTS) <= set(outputs):
            raise ValueError(
                f"not a question-answering model: {self._path.name} outputs {outputs}; a QA model outputs "
                f"{' and '.join(OUTPUTS)}"
            )
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

    def estimate_bytes(self, spec: ModelSpec, *, intra_op_threads: int) -> int:
        """The weight files' size, once per replica that load() makes with `intra_op_threads` (each replica holds
        its own session)."""
        path = find_onnx(Path(spec.source))
        if path is None:
            return 0
        replicas = replica_plan(self.devices(spec)[0], spec.replicas_per_device, intra_op_threads).count
        return _weights_size(path) * replicas

    def load(self, spec: ModelSpec, *, pad_token_id: int, intra_op_threads: int) -> Loaded:
        """Serves the directory's ONNX file; a manifest beside it (qaserve export's) is not needed: the revision is
        the file's sha256 and the dtype is read from the graph."""
        directory = Path(spec.source)
        path = find_onnx(directory)
        if path is None:
            raise ValueError(
                f"the onnx backend needs an ONNX file ({' or '.join(ONNX_LAYOUTS)}); make one with `qaserve export`"
            )
        dtype = graph_dtype(path)
        if spec.dtype not in ("auto", dtype):
            raise ValueError(
                f"dtype {spec.dtype!r} does not match {path.name}, which is {dtype} (use auto or the torch backend)"
            )
        return load_replicas(
            spec,
            self.devices(spec),
            intra_op_threads,
            lambda label, device, threads: OnnxReplica(label, device, path, pad_token_id, threads),
            lambda replicas, close: Loaded(
                backend=self.name,
                replicas=replicas,
                dtype=dtype,
                nbytes=_weights_size(path) * len(replicas),
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
