"""What every HTTP route shares: reading and parsing bodies within limits, the per-call scope, error responses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from qaserve.api.errors import ErrorStatus
from qaserve.api.health import DrainingHealthServicer
from qaserve.api.scope import REQUEST_ID_KEY, CallScope
from qaserve.errors import BodyTooLarge, InvalidArgument, MalformedJson, SlowRequest, UnsupportedMediaType, shorten
from qaserve.metrics import Metrics
from qaserve.runtime import QAEngine
from qaserve.tracing import Tracing

JSON = "application/json"
# The HTTP form of a gRPC deadline: seconds the client will wait (DEADLINE_EXCEEDED, 504, when too short).
TIMEOUT_HEADER = "x-request-timeout"
Model = TypeVar("Model", bound=BaseModel)


def error_response(failure: ErrorStatus, request_id: str = "", v2: bool = False) -> JSONResponse:
    """The HTTP form of an error: its status, Retry-After / WWW-Authenticate, and qaserve's or V2's JSON body."""
    headers = failure.http_headers()
    if request_id:
        headers[REQUEST_ID_KEY] = request_id
    body = failure.v2_body() if v2 else failure.http_body()
    return JSONResponse(body, status_code=failure.http_status, headers=headers)


def is_v2(request: Request) -> bool:
    """Whether the request is the Open Inference Protocol's, whose errors take its own shape."""
    path: str = request.url.path
    return path == "/v2" or path.startswith("/v2/")


class HttpDoor:
    """The engine behind the HTTP routes, and the bookkeeping each call gets (as RpcScope gives gRPC calls)."""

    def __init__(
        self,
        engine: QAEngine,
        metrics: Metrics,
        health: DrainingHealthServicer,
        *,
        max_body_bytes: int,
        read_timeout: float,
        tracing: Tracing | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.health = health
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.tracing = tracing

    async def call(
        self, method: str, request: Request, model: str, work: Callable[[CallScope], Awaitable[Response]]
    ) -> Response:
        """Runs `work` as one call: request id (X-Request-Id in and out), in-flight gauge, duration by code, a
        SERVER span continuing `traceparent` when tracing is on, and any error as its HTTP response."""
        scope = CallScope(
            self.metrics,
            method,
            self.engine.registry.label(model),
            request.headers.get(REQUEST_ID_KEY, ""),
            _peer(request),
        )
        with self._span(request):
            scope.begin()
            try:
                response = await work(scope)
            except Exception as error:
                failure = scope.end(error)
                assert failure is not None
                return error_response(failure, scope.request_id, is_v2(request))
            except BaseException as error:
                scope.end(error)
                raise
            if isinstance(response, StreamingResponse):  # the call lasts until its last line is sent
                response.body_iterator = _ending(response.body_iterator, scope)
            else:
                scope.end(None)
        response.headers[REQUEST_ID_KEY] = scope.request_id
        return response

    def _span(self, request: Request) -> contextlib.AbstractContextManager[object]:
        if self.tracing is None:
            return contextlib.nullcontext()
        return self.tracing.server_span(f"{request.method} {request.url.path}", dict(request.headers))

    def deadline(self, request: Request) -> float | None:
        """The X-Request-Timeout header (seconds from now) on the event loop's clock, if the client sent one."""
        given = request.headers.get(TIMEOUT_HEADER)
        if given is None:
            return None
        try:
            seconds = float(given)
        except ValueError:
            seconds = 0.0
        if not 0 < seconds < float("inf"):
            raise InvalidArgument(TIMEOUT_HEADER, f"must be positive seconds, got {shorten(given)!r}")
        return asyncio.get_running_loop().time() + seconds

    async def body(self, request: Request) -> bytes:
        """The request body: BodyTooLarge past the limit, SlowRequest when it takes longer than the read timeout."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge(self.max_body_bytes)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise BodyTooLarge(self.max_body_bytes)
                    chunks.append(chunk)
        except TimeoutError:
            raise SlowRequest(self.read_timeout) from None
        return b"".join(chunks)

    async def json(self, request: Request, accepted: tuple[str, ...] = ()) -> Any:
        """The body parsed as JSON. It must be sent as application/json (or a +json type, or with no content type;
        `accepted` adds others)."""
        check_content_type(request, accepted)
        return parse_json(await self.body(request))


def check_content_type(request: Request, accepted: tuple[str, ...] = ()) -> None:
    given = request.headers.get("content-type", "")
    media = given.partition(";")[0].strip().lower()
    if media and media != JSON and not media.endswith("+json") and media not in accepted:
        raise UnsupportedMediaType(given, " or ".join((JSON, *accepted)))


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise MalformedJson("is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise MalformedJson(f"is not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None


def validated(model: type[Model], data: Any) -> Model:
    """`data` as `model`; InvalidArgument names the first field at fault (unknown fields included)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        # The deepest error: of a union (one input or a list of them), the member the value was meant as.
        first = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))
        field = ".".join(str(part) for part in first["loc"] if not _is_type_name(part)) or "body"
        description = "is not a field of this request" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidArgument(shorten(field), description) from None


async def _ending(body: AsyncIterable[Any], scope: CallScope) -> AsyncIterator[Any]:
    """`body`, then the end of the call's scope (the error it stopped on, if any, or the code set meanwhile)."""
    error: BaseException | None = None
    try:
        async for chunk in body:
            yield chunk
    except BaseException as stopped:
        error = stopped
        raise
    finally:
        scope.end(error)


def _is_type_name(part: str | int) -> bool:
    """Whether a pydantic error location part names a union member's type (HFInputs, list[HFInputs]), no field."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else ""
