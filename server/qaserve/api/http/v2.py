"""The Open Inference Protocol's REST routes (/v2/...), with its binary tensor data extension; errors in V2's
own shape ({"error": message})."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qaserve.api import v2
from qaserve.api.http.door import HttpDoor, check_content_type, parse_json, validated
from qaserve.api.scope import CallScope
from qaserve.errors import InvalidArgument

# The binary tensor data extension: the JSON part's length when binary tensors follow it in the body.
HEADER_LENGTH = "inference-header-content-length"
OCTET_STREAM = "application/octet-stream"
_STRICT = ConfigDict(extra="forbid", strict=True)
Parameters = dict[str, bool | int | float | str]


class V2InputTensor(BaseModel):
    """An input: `data` in JSON, or `parameters.binary_data_size` bytes after the JSON part."""

    model_config = _STRICT
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: list[Any] | None = None


class V2OutputRequest(BaseModel):
    model_config = _STRICT
    name: str
    parameters: Parameters = Field(default_factory=dict)


class V2InferRequest(BaseModel):
    """POST /v2/models/{name}/infer: `question` and `context` (BYTES [N]); decoding parameters in `parameters`."""

    model_config = _STRICT
    id: str = ""
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[V2InputTensor]
    outputs: list[V2OutputRequest] = Field(default_factory=list)


BODY_MODELS: tuple[type[BaseModel], ...] = (V2InferRequest,)


def v2_routes(door: HttpDoor) -> APIRouter:
    """/v2, its health, model metadata and readiness, and infer."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
    engine = door.engine

    @router.get("")
    async def server_metadata() -> Response:
        return JSONResponse(v2.server_metadata())

    @router.get("/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @router.get("/health/ready")
    async def ready() -> Response:
        serving = door.health.serving()
        return JSONResponse({"ready": serving}, status_code=200 if serving else 503)

    # A model has the one version "1"; the protocol's versioned paths name it, or any version, alike.
    @router.get("/models/{name}/versions/{version}")
    @router.get("/models/{name}")
    async def model_metadata(request: Request, name: str) -> Response:
        async def work(scope: CallScope) -> Response:
            return JSONResponse(v2.model_metadata(engine.registry.spec(name).name))

        return await door.call("v2.ModelMetadata", request, name, work)

    @router.get("/models/{name}/versions/{version}/ready")
    @router.get("/models/{name}/ready")
    async def model_ready(request: Request, name: str) -> Response:
        async def work(scope: CallScope) -> Response:
            ready = v2.is_ready(engine, name)
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

        return await door.call("v2.ModelReady", request, name, work)

    infer_body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}},
        }
    }

    @router.post("/models/{name}/versions/{version}/infer", openapi_extra=infer_body)
    @router.post("/models/{name}/infer", openapi_extra=infer_body)
    async def infer(request: Request, name: str) -> Response:
        async def work(scope: CallScope) -> Response:
            engine.registry.spec(name)
            check_content_type(request, (OCTET_STREAM,))
            body = await door.body(request)
            header, binary = _split(body, request.headers.get(HEADER_LENGTH))
            parsed = validated(V2InferRequest, parse_json(header))
            requests = v2.qa_requests(name, _inputs(parsed, binary), parsed.parameters)
            results = await v2.answer_all(engine, requests, v2.deadline(parsed.parameters, door.deadline(request)))
            tensors = v2.output_tensors(results, [o.name for o in parsed.outputs])
            return _response(name, parsed, tensors)

        return await door.call("v2.ModelInfer", request, name, work)

    return router


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidArgument("Inference-Header-Content-Length", "must be the length of the JSON part of the body")
    length = int(header_length)
    return body[:length], body[length:]


def _inputs(request: V2InferRequest, binary: bytes) -> dict[str, list[str]]:
    inputs: dict[str, list[str]] = {}
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise InvalidArgument(f"inputs.{tensor.name}.parameters.binary_data_size", "exceeds the binary data")
            values: list[Any] = v2.unpack_bytes(tensor.name, binary[offset : offset + size])
            offset += size
        elif tensor.data is not None:
            values = tensor.data
        else:
            raise InvalidArgument(f"inputs.{tensor.name}", "has neither data nor parameters.binary_data_size")
        inputs[tensor.name] = v2.texts(tensor.name, tensor.datatype, tensor.shape, values)
    return inputs


def _response(name: str, request: V2InferRequest, tensors: list[v2.Tensor]) -> Response:
    """JSON, or JSON then binary tensors where the request asked for binary data (output or request parameter)."""
    binary_by_default = request.parameters.get("binary_data_output") is True
    asked = {o.name: o.parameters.get("binary_data", binary_by_default) is True for o in request.outputs}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in tensors:
        output: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if asked.get(tensor.name, binary_by_default):
            blob = v2.raw(tensor)
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            output["data"] = [value.decode("utf-8") for value in tensor.values.flat]
        else:
            output["data"] = tensor.values.ravel().tolist()
        outputs.append(output)
    body = {"model_name": name, "model_version": "1", "id": request.id, "outputs": outputs}
    if not blobs:
        return JSONResponse(body)
    header = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        header + b"".join(blobs), media_type=OCTET_STREAM, headers={"Inference-Header-Content-Length": str(len(header))}
    )
