"""The HTTP door's ASGI application: every protocol's routes over one HttpDoor, bearer tokens, CORS, errors."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from qaserve import __version__
from qaserve.api.auth import AUTHORIZATION_KEY, BearerTokens, authorization_error
from qaserve.api.errors import error_status
from qaserve.api.http import routes, v2
from qaserve.api.http.door import HttpDoor, error_response, is_v2
from qaserve.api.http.listener import MAX_HEADER_BYTES
from qaserve.errors import HeadersTooLarge, RouteNotFound
from qaserve.metrics import Metrics

# Open without a token, as health and reflection are on gRPC: probes, the page itself (its requests carry the
# token a person types) and the API description.
OPEN_ROUTES = frozenset(
    ("GET", path) for path in ("/", "/health", "/openapi.json", "/v2/health/live", "/v2/health/ready")
)


def create_http_app(door: HttpDoor, tokens: BearerTokens | None = None, cors_origins: str = "") -> ASGIApp:
    """The application: Hugging Face, qaserve JSON and V2 routes, /health, /openapi.json and the page."""
    app = FastAPI(
        title="qaserve",
        version=__version__,
        description="Extractive question answering: the Hugging Face task schema, qaserve JSON (the protobuf JSON "
        "mapping of qaserve.v1) and the Open Inference Protocol v2.",
        docs_url=None,  # the interactive docs load their scripts from a CDN
        redoc_url=None,
    )
    app.include_router(routes.routes(door))
    app.include_router(v2.v2_routes(door))

    async def not_found(request: Request, error: Exception) -> Response:
        missing = RouteNotFound(request.method, request.url.path)
        if isinstance(error, HTTPException) and error.status_code == 405:
            missing.http_status = 405
        return error_response(error_status(missing, door.metrics, "http"), v2=is_v2(request))

    app.add_exception_handler(HTTPException, not_found)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (*routes.BODY_MODELS, *v2.BODY_MODELS):
                described = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(described.pop("$defs", {}))
                components[model.__name__] = described
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    asgi: ASGIApp = app
    if tokens is not None:
        asgi = BearerTokenMiddleware(asgi, tokens, door.metrics)
    asgi = HeaderLimitMiddleware(asgi, door.metrics)
    origins = [o.strip() for o in cors_origins.split(",") if o.strip()]
    if origins:  # outermost: preflight requests carry no token
        asgi = CORSMiddleware(
            asgi,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id", "x-request-timeout", "traceparent"],
            expose_headers=["x-request-id", "retry-after"],
        )
    return asgi


class HeaderLimitMiddleware:
    """431 for a request whose headers add up past MAX_HEADER_BYTES (h11 bounds headers still arriving; this
    bounds those that arrived in one read)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            failure = error_status(HeadersTooLarge(MAX_HEADER_BYTES), self.metrics, "http")
            await error_response(failure, v2=is_v2(Request(scope)))(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BearerTokenMiddleware:
    """Rejects with 401 (MISSING_TOKEN or INVALID_TOKEN) every request outside OPEN_ROUTES without an accepted
    `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, tokens: BearerTokens, metrics: Metrics) -> None:
        self.app = app
        self.tokens = tokens
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        error = authorization_error(self.tokens, request.headers.get(AUTHORIZATION_KEY))
        if error is None:
            await self.app(scope, receive, send)
            return
        failure = error_status(error, self.metrics, f"{scope['method']} {scope['path']}")
        await error_response(failure, v2=is_v2(request))(scope, receive, send)
