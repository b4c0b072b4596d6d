"""Requests that cannot be parsed: INTERNAL with a generic message (gRPC's code for it), never the parser's text."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from qaserve.api.errors import abort, error_status
from qaserve.errors import MalformedRequest
from qaserve.metrics import Metrics


class _Unparsed:
    """Stands in for a message whose bytes did not parse (grpc.aio would answer UNKNOWN with the parser's text)."""


UNPARSED = _Unparsed()

# How long a stream whose request did not parse goes on reading (and dropping) what the client still sends before it
# ends: a grpc.aio client whose write is cut off by the end of the call reports "Internal error from Core" instead of
# the status (grpc/grpc#36066). Read up to its half-close, it gets MALFORMED_REQUEST; one writing past this may not.
DRAIN_SECONDS = 0.5


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parses requests itself, so that undecodable bytes end the call with MalformedRequest's status."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:
                return UNPARSED

        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        behavior = getattr(handler, kind)
        wrapped = self._wrap(behavior, kind.startswith("stream"), details.method)
        if wrapped is None:
            return handler  # a synchronous handler: grpc's own parsing stays
        return handler._replace(request_deserializer=tolerant, **{kind: wrapped})

    def _wrap(self, behavior: Callable[..., Any], streamed: bool, method: str) -> Callable[..., Any] | None:
        """The same kind of callable as `behavior` (grpc.aio dispatches on it), checking what was parsed."""

        async def requests_of(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                if request is UNPARSED:
                    await _drain(requests, DRAIN_SECONDS)
                    raise MalformedRequest()  # RpcScope maps it, as any error of the handler
                yield request

        async def first(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if streamed:
                return requests_of(request)
            if request is UNPARSED:
                await abort(context, error_status(MalformedRequest(), self.metrics, method))
            return request

        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in behavior(await first(request, context), context):
                    yield response

            return generator
        if inspect.iscoroutinefunction(behavior):

            async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await behavior(await first(request, context), context)

            return coroutine
        return None


async def _drain(requests: AsyncIterator[Any], within: float) -> None:
    """Reads and drops `requests` up to the client's half-close, for `within` seconds at most."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            async for _ in requests:
                pass
