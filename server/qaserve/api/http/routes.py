"""HTTP routes in the Hugging Face question-answering task schema and in qaserve's own JSON (the protobuf JSON
mapping of qaserve.v1), health, and the page for browsers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

from fastapi import APIRouter
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from qaserve.api import converters, v2
from qaserve.api.errors import error_status
from qaserve.api.http.door import HttpDoor, validated
from qaserve.api.models import model_message
from qaserve.api.scope import CallScope
from qaserve.errors import InvalidArgument, shorten
from qaserve.qa import QAParams, QARequest, QAResult
from qaserve.qa.types import MAX_TOP_K
from qaserve_client.v1 import model_service_pb2 as models_pb
from qaserve_client.v1 import question_answering_pb2 as pb

NDJSON = "application/x-ndjson"
Parsed = TypeVar("Parsed", bound=Message)
_STRICT = ConfigDict(extra="forbid", strict=True)


class HFInputs(BaseModel):
    """One question about one context."""

    model_config = _STRICT
    question: str
    context: str


class HFParameters(BaseModel):
    """The decoding parameters of the Hugging Face question-answering task; unset (null) ones take the model's."""

    model_config = _STRICT
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    doc_stride: int | None = Field(None, ge=0)
    max_answer_len: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=1)
    max_question_len: int | None = Field(None, ge=1)
    handle_impossible_answer: bool | None = None
    align_to_words: bool | None = None


class HFRequest(BaseModel):
    """POST / and POST /models/{name}: one input, or a list of them answered together."""

    model_config = _STRICT
    inputs: HFInputs | list[HFInputs]
    parameters: HFParameters | None = None


class HFAnswer(BaseModel):
    """An answer: its text, score, and code point offsets into the context (answer == context[start:end])."""

    answer: str
    score: float
    start: int
    end: int


BODY_MODELS: tuple[type[BaseModel], ...] = (HFRequest, HFAnswer)


def hf_params(given: HFParameters | None) -> QAParams:
    """The parameters given; unset (null) ones keep QAParams' defaults (same field names)."""
    return QAParams(**given.model_dump(exclude_none=True)) if given is not None else QAParams()


def hf_answer(result: QAResult, top_k: int | None) -> Any:
    """One item's answers as the task schema gives them: an object for top_k 1 (or unset), a list otherwise."""
    answers = [{"answer": a.answer, "score": a.score, "start": a.start, "end": a.end} for a in result.answers]
    if top_k is None or top_k == 1:
        return answers[0] if answers else {"answer": "", "score": 0.0, "start": 0, "end": 0}
    return answers


def message_json(message: Message, status_code: int = 200) -> JSONResponse:
    return JSONResponse(_dict(message), status_code=status_code)


def _dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def parsed(message: Parsed, data: Any) -> Parsed:
    """`data` (parsed JSON) as the protobuf `message`, by the protobuf JSON mapping; InvalidArgument names the
    field at fault."""
    if not isinstance(data, dict):
        raise InvalidArgument("body", f"must be a JSON object ({message.DESCRIPTOR.name})")
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as error:
        text = str(error).splitlines()[0]
        unknown = next((k for k in data if k not in _field_names(message)), None)
        if unknown is not None:
            raise InvalidArgument(shorten(unknown), "is not a field of this request") from None
        field = text.removeprefix("Failed to parse ").partition(" field")[0] if text.startswith("Failed") else "body"
        raise InvalidArgument(shorten(field), shorten(text, 200)) from None
    return message


def _field_names(message: Message) -> set[str]:
    return {n for f in message.DESCRIPTOR.fields for n in (f.name, f.json_name)}


def page() -> str:
    return resources.files("qaserve.api.http").joinpath("page.html").read_text(encoding="utf-8")


def routes(door: HttpDoor) -> APIRouter:
    """The Hugging Face, qaserve JSON, health and page routes over `door`."""
    router = APIRouter()
    engine = door.engine
    registry = engine.registry
    html = page()

    async def hf(request: Request, model: str) -> Response:
        async def work(scope: CallScope) -> Response:
            body = validated(HFRequest, await door.json(request))
            params = hf_params(body.parameters)
            at = door.deadline(request)
            items = body.inputs if isinstance(body.inputs, list) else [body.inputs]
            requests = [QARequest(i.question, i.context, model, params) for i in items]
            results = await v2.answer_all(engine, requests, at)
            answers = [hf_answer(r, params.top_k) for r in results]
            return JSONResponse(answers if isinstance(body.inputs, list) else answers[0])

        return await door.call("http.HuggingFace", request, model, work)

    hf_body = {"requestBody": {"required": True, "content": {"application/json": _ref(HFRequest)}}}
    hf_answers = {"200": {"description": "an answer (a list with top_k > 1, one per input for a list of inputs)",
                          "content": {"application/json": _ref(HFAnswer)}}}  # fmt: skip

    @router.post("/", tags=["Hugging Face"], openapi_extra={**hf_body, "responses": hf_answers})
    async def answer_default(request: Request) -> Response:
        """Answers in the Hugging Face question-answering task schema with the default model."""
        return await hf(request, "")

    @router.post("/models/{name}", tags=["Hugging Face"], openapi_extra={**hf_body, "responses": hf_answers})
    async def answer_with(request: Request, name: str) -> Response:
        """Answers in the Hugging Face question-answering task schema with the model `name`."""
        return await hf(request, name)

    async def unary(
        request: Request,
        method: str,
        message: Message,
        run: Callable[[Any, float | None], Awaitable[Any]],
        respond: Callable[[Any, str], Message],
    ) -> Response:
        """One unary qaserve.v1 call: the JSON body as `message`, `run` on it, `respond` with the result."""

        async def work(scope: CallScope) -> Response:
            given: Any = parsed(message, await door.json(request))
            scope.model = registry.label(given.model)
            result = await run(given, door.deadline(request))
            scope.timing = result.timing
            return message_json(respond(result, scope.request_id))

        return await door.call(method, request, "", work)

    @router.post("/v1/answer", tags=["qaserve"], openapi_extra=_proto_body(pb.AnswerRequest, pb.AnswerResponse))
    async def answer(request: Request) -> Response:
        """QuestionAnsweringService.Answer: AnswerRequest -> AnswerResponse in the protobuf JSON mapping."""
        return await unary(
            request,
            "http.Answer",
            pb.AnswerRequest(),
            lambda given, at: engine.answer(converters.qa_request(given), deadline=at),
            converters.answer_response,
        )

    @router.post("/v1/read", tags=["qaserve"], openapi_extra=_proto_body(pb.ReadRequest, pb.ReadResponse))
    async def read(request: Request) -> Response:
        """QuestionAnsweringService.Read: ReadRequest -> ReadResponse in the protobuf JSON mapping."""
        return await unary(
            request,
            "http.Read",
            pb.ReadRequest(),
            lambda given, at: engine.read(converters.read_request(given), deadline=at),
            converters.read_response,
        )

    @router.post(
        "/v1/answer:progressive",
        tags=["qaserve"],
        openapi_extra=_proto_body(pb.AnswerProgressiveRequest, pb.AnswerProgressiveResponse, NDJSON),
    )
    async def answer_progressive(request: Request) -> Response:
        """QuestionAnsweringService.AnswerProgressive: newline-delimited JSON, one AnswerProgressiveResponse a line
        (partials, then the final); an error after the first line comes as a last line {"error": {...}}."""

        async def work(scope: CallScope) -> Response:
            message = parsed(pb.AnswerProgressiveRequest(), await door.json(request))
            scope.model = registry.label(message.request.model)
            updates = engine.answer_progressive(converters.qa_request(message.request), door.deadline(request))
            first = await anext(updates)  # errors before the first line get their HTTP status
            return StreamingResponse(_lines(door, first, updates, scope), media_type=NDJSON)

        return await door.call("http.AnswerProgressive", request, "", work)

    @router.get("/v1/models", tags=["qaserve"])
    async def list_models(request: Request) -> Response:
        """ModelService.ListModels."""

        async def work(scope: CallScope) -> Response:
            listed = [model_message(i) for i in registry.infos()]
            return message_json(models_pb.ListModelsResponse(models=listed, request_id=scope.request_id))

        return await door.call("http.ListModels", request, "", work)

    @router.get("/v1/models/{name}", tags=["qaserve"])
    async def get_model(request: Request, name: str) -> Response:
        """ModelService.GetModel."""

        async def work(scope: CallScope) -> Response:
            found = model_message(registry.info(name))
            return message_json(models_pb.GetModelResponse(model=found, request_id=scope.request_id))

        return await door.call("http.GetModel", request, name, work)

    @router.post("/v1/models/{name}/load", tags=["qaserve"])
    async def load_model(request: Request, name: str) -> Response:
        """ModelService.LoadModel: loads (or retries) the model, answering once it is ready."""

        async def work(scope: CallScope) -> Response:
            loaded = model_message(await registry.load(name))
            return message_json(models_pb.LoadModelResponse(model=loaded, request_id=scope.request_id))

        return await door.call("http.LoadModel", request, name, work)

    @router.post("/v1/models/{name}/unload", tags=["qaserve"])
    async def unload_model(request: Request, name: str) -> Response:
        """ModelService.UnloadModel."""

        async def work(scope: CallScope) -> Response:
            unloaded = model_message(await registry.unload(name))
            return message_json(models_pb.UnloadModelResponse(model=unloaded, request_id=scope.request_id))

        return await door.call("http.UnloadModel", request, name, work)

    @router.get("/health", tags=["health"])
    async def health() -> Response:
        """200 {"status": "SERVING"} while the server serves; 503 NOT_SERVING while it starts or drains."""
        serving = door.health.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    @router.get("/", include_in_schema=False)
    async def browser_page() -> Response:
        return HTMLResponse(html)

    return router


async def _lines(
    door: HttpDoor, first: object, updates: AsyncIterator[object], scope: CallScope
) -> AsyncIterator[bytes]:
    """The stream's lines; an error after the first ends it with a line of its own, under the call's code."""
    async with contextlib.aclosing(updates):  # type: ignore[type-var]
        update = first
        while True:
            if isinstance(update, QAResult):
                scope.timing = update.timing
            yield _line(_dict(converters.progressive_response(update, scope.request_id)))  # type: ignore[arg-type]
            try:
                update = await anext(updates)
            except StopAsyncIteration:
                return
            except Exception as error:
                failure = error_status(error, door.metrics, scope.method)
                scope.code = failure.code.name
                yield _line(failure.http_body())
                return


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}


def _proto_body(request: type[Message], response: type[Message], media: str = "application/json") -> dict[str, Any]:
    """An OpenAPI body naming the qaserve.v1 message (protos/ has the fields)."""

    def described(message: type[Message]) -> dict[str, Any]:
        name = message.DESCRIPTOR.full_name
        return {"schema": {"type": "object", "description": f"{name} in the protobuf JSON mapping"}}

    return {
        "requestBody": {"required": True, "content": {"application/json": described(request)}},
        "responses": {"200": {"description": response.DESCRIPTOR.full_name, "content": {media: described(response)}}},
    }
