"""The Open Inference Protocol (KServe V2) over the engine: tensors <-> QA requests, and its gRPC service.

A V2 model here takes `question` and `context` (BYTES, shape [N]) and the decoding parameters as request
parameters, and gives `answer` (BYTES [N, K]), `score` (FP32 [N, K]), `start` and `end` (INT64 [N, K], code point
offsets), K being the most answers any of the N items got (at most top_k); an item with fewer answers is padded with
"", 0 and -1. The messages are tritonclient's (inference.GRPCInferenceService); the REST routes
(api/http/v2.py) share everything else.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor

from qaserve import __version__
from qaserve.api.health import DrainingHealthServicer
from qaserve.api.scope import RpcScope
from qaserve.errors import InvalidArgument
from qaserve.metrics import Metrics
from qaserve.qa import QAParams, QARequest, QAResult
from qaserve.runtime import ModelState, QAEngine

V2_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "qaserve_extractive_qa"
INPUTS = ("question", "context")
# name -> (datatype, numpy dtype, padding)
OUTPUTS: dict[str, tuple[str, type, object]] = {
    "answer": ("BYTES", np.object_, b""),
    "score": ("FP32", np.float32, 0.0),
    "start": ("INT64", np.int64, -1),
    "end": ("INT64", np.int64, -1),
}
INT_PARAMETERS = ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len")
BOOL_PARAMETERS = ("handle_impossible_answer", "align_to_words")
# Microseconds the server may take (Triton's request parameter); the gRPC deadline also applies.
TIMEOUT_PARAMETER = "timeout"
# Parameters of the binary tensor data extension, read by the REST door.
TRANSPORT_PARAMETERS = ("binary_data_output", "binary_data", "binary_data_size")

ParameterValue = bool | int | float | str


@dataclass(frozen=True)
class Tensor:
    """One output tensor: name, V2 datatype, shape and row-major values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray


def server_metadata() -> dict[str, object]:
    return {"name": "qaserve", "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(name: str) -> dict[str, object]:
    """What GET /v2/models/NAME and ModelMetadata describe: the inputs and outputs above."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in INPUTS],
        "outputs": [{"name": n, "datatype": d, "shape": [-1, -1]} for n, (d, _, _) in OUTPUTS.items()],
    }


def texts(name: str, datatype: str, shape: Sequence[int], values: Sequence[object]) -> list[str]:
    """An input tensor's strings (UTF-8), checked against its declared datatype and shape."""
    if name not in INPUTS:
        raise InvalidArgument(f"inputs.{name}", f"is not an input of this model (inputs: {', '.join(INPUTS)})")
    if datatype != "BYTES":
        raise InvalidArgument(f"inputs.{name}.datatype", f"must be BYTES, got {datatype}")
    if len(shape) != 1 or shape[0] != len(values):
        raise InvalidArgument(f"inputs.{name}.shape", f"must be [N] with N = {len(values)} elements, got {list(shape)}")
    strings = []
    for value in values:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"inputs.{name}", "must be UTF-8 text") from None
        if not isinstance(value, str):
            raise InvalidArgument(f"inputs.{name}", "must hold strings")
        strings.append(value)
    return strings


def unpack_bytes(name: str, raw: bytes) -> list[object]:
    """The elements of a BYTES tensor in the binary form (4-byte little-endian length before each)."""
    try:
        return list(deserialize_bytes_tensor(raw))
    except Exception:
        raise InvalidArgument(f"inputs.{name}", "binary BYTES data is not length-prefixed elements") from None


def qa_requests(
    model: str, inputs: Mapping[str, list[str]], parameters: Mapping[str, ParameterValue]
) -> list[QARequest]:
    """One QARequest per item of the `question` and `context` tensors."""
    missing = [n for n in INPUTS if n not in inputs]
    if missing:
        raise InvalidArgument("inputs", f"missing {', '.join(missing)} (inputs: {', '.join(INPUTS)})")
    questions, contexts = inputs["question"], inputs["context"]
    if len(questions) != len(contexts):
        raise InvalidArgument("inputs", f"question has {len(questions)} items but context has {len(contexts)}")
    if not questions:
        raise InvalidArgument("inputs", "hold no items")
    params = qa_params(parameters)
    return [QARequest(q, c, model, params) for q, c in zip(questions, contexts, strict=True)]


def qa_params(parameters: Mapping[str, ParameterValue]) -> QAParams:
    given: dict[str, Any] = {}
    for name, value in parameters.items():
        if name in INT_PARAMETERS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"parameters.{name}", f"must be an integer, got {value!r}")
            given[name] = value
        elif name in BOOL_PARAMETERS:
            if not isinstance(value, bool):
                raise InvalidArgument(f"parameters.{name}", f"must be a boolean, got {value!r}")
            given[name] = value
        elif name not in (TIMEOUT_PARAMETER, *TRANSPORT_PARAMETERS):
            known = ", ".join((*INT_PARAMETERS, *BOOL_PARAMETERS, TIMEOUT_PARAMETER))
            raise InvalidArgument(f"parameters.{name}", f"is not a parameter of this model ({known})")
    return QAParams(**given)


def deadline(parameters: Mapping[str, ParameterValue], grpc_deadline: float | None = None) -> float | None:
    """The earlier of the `timeout` parameter (microseconds from now) and `grpc_deadline` (loop clock)."""
    timeout = parameters.get(TIMEOUT_PARAMETER)
    if timeout is None:
        return grpc_deadline
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise InvalidArgument(f"parameters.{TIMEOUT_PARAMETER}", f"must be positive microseconds, got {timeout!r}")
    own = asyncio.get_running_loop().time() + timeout / 1e6
    return own if grpc_deadline is None else min(own, grpc_deadline)


async def answer_all(engine: QAEngine, requests: Sequence[QARequest], at: float | None) -> list[QAResult]:
    """Every item's answers, the items batched together by the engine; the first failure fails the call."""
    return list(await asyncio.gather(*(engine.answer(r, deadline=at) for r in requests)))


def output_tensors(results: Sequence[QAResult], wanted: Sequence[str] = ()) -> list[Tensor]:
    """The `wanted` outputs (all when empty) of the items' results, [N, K] each."""
    unknown = [n for n in wanted if n not in OUTPUTS]
    if unknown:
        raise InvalidArgument("outputs", f"{unknown[0]!r} is not an output of this model ({', '.join(OUTPUTS)})")
    k = max(len(r.answers) for r in results)
    tensors = []
    for name in wanted or OUTPUTS:
        datatype, dtype, padding = OUTPUTS[name]
        values: np.ndarray = np.full((len(results), k), padding, dtype=dtype)
        for row, result in enumerate(results):
            for column, found in enumerate(result.answers):
                value = getattr(found, name)
                values[row, column] = value.encode("utf-8") if name == "answer" else value
        tensors.append(Tensor(name, datatype, (len(results), k), values))
    return tensors


def raw(tensor: Tensor) -> bytes:
    """A tensor in the binary form: BYTES length-prefixed, numbers little-endian."""
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(value)) + value for value in tensor.values.flat)
    return tensor.values.astype(tensor.values.dtype.newbyteorder("<")).tobytes()


def is_ready(engine: QAEngine, name: str) -> bool:
    """Whether a configured model is loaded; ModelNotFound for others."""
    return engine.registry.info(name).state is ModelState.READY


class V2Servicer:
    """inference.GRPCInferenceService: health, metadata and ModelInfer (register with handler())."""

    def __init__(self, engine: QAEngine, metrics: Metrics, health: DrainingHealthServicer) -> None:
        self.engine = engine
        self.metrics = metrics
        self.health = health

    def _scope(self, method: str, context: grpc.aio.ServicerContext, model: str) -> RpcScope:
        return RpcScope(self.metrics, f"v2.{method}", context, self.engine.registry.label(model))

    async def ServerLive(self, request: object, context: grpc.aio.ServicerContext) -> object:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: object, context: grpc.aio.ServicerContext) -> object:
        return service_pb2.ServerReadyResponse(ready=self.health.serving())

    async def ModelReady(self, request: object, context: grpc.aio.ServicerContext) -> object:
        name = request.name  # type: ignore[attr-defined]
        async with self._scope("ModelReady", context, name):
            return service_pb2.ModelReadyResponse(ready=is_ready(self.engine, name))

    async def ServerMetadata(self, request: object, context: grpc.aio.ServicerContext) -> object:
        return service_pb2.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: object, context: grpc.aio.ServicerContext) -> object:
        name = request.name  # type: ignore[attr-defined]
        async with self._scope("ModelMetadata", context, name):
            spec = self.engine.registry.spec(name)
            metadata = model_metadata(spec.name)
            return service_pb2.ModelMetadataResponse(
                name=spec.name,
                versions=metadata["versions"],
                platform=PLATFORM,
                inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["inputs"]],  # type: ignore[attr-defined]
                outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["outputs"]],  # type: ignore[attr-defined]
            )

    async def ModelInfer(self, request: object, context: grpc.aio.ServicerContext) -> object:
        name: str = request.model_name  # type: ignore[attr-defined]
        async with self._scope("ModelInfer", context, name) as scope:
            self.engine.registry.spec(name)  # ModelNotFound before anything else
            parameters = {k: _parameter(v) for k, v in request.parameters.items()}  # type: ignore[attr-defined]
            requests = qa_requests(name, _grpc_inputs(request), parameters)
            results = await answer_all(self.engine, requests, deadline(parameters, scope.deadline()))
            tensors = output_tensors(results, [o.name for o in request.outputs])  # type: ignore[attr-defined]
            return service_pb2.ModelInferResponse(
                model_name=name,
                model_version="1",
                id=request.id,  # type: ignore[attr-defined]
                outputs=[
                    service_pb2.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                    for t in tensors
                ],
                raw_output_contents=[raw(t) for t in tensors],
            )


def handler(servicer: V2Servicer) -> grpc.GenericRpcHandler:
    """The service's methods that V2Servicer serves, on tritonclient's messages; gRPC itself answers the others
    (repository, shared memory, statistics, streaming) with UNIMPLEMENTED."""
    methods = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
    return grpc.method_handlers_generic_handler(
        V2_SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name),
                request_deserializer=getattr(service_pb2, f"{name}Request").FromString,
                response_serializer=getattr(service_pb2, f"{name}Response").SerializeToString,
            )
            for name in methods
        },
    )


def _grpc_inputs(request: object) -> dict[str, list[str]]:
    inputs: dict[str, list[str]] = {}
    raw_contents = request.raw_input_contents  # type: ignore[attr-defined]
    for index, tensor in enumerate(request.inputs):  # type: ignore[attr-defined]
        if raw_contents:
            if index >= len(raw_contents):
                raise InvalidArgument("raw_input_contents", "needs one entry per input")
            values: list[object] = unpack_bytes(tensor.name, raw_contents[index])
        else:
            values = list(tensor.contents.bytes_contents)
        inputs[tensor.name] = texts(tensor.name, tensor.datatype, list(tensor.shape), values)
    return inputs


def _parameter(value: object) -> ParameterValue:
    """An InferParameter's value (its oneof)."""
    which = value.WhichOneof("parameter_choice")  # type: ignore[attr-defined]
    result: ParameterValue = getattr(value, which) if which else ""
    return result
