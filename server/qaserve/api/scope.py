"""Per-RPC bookkeeping: in-flight gauge, duration by method/model/code, and turning errors into statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType

import grpc

from qaserve.api.errors import internal_status, to_status
from qaserve.errors import QAServeError
from qaserve.metrics import Metrics

log = logging.getLogger(__name__)


class RpcScope:
    """`async with RpcScope(...) as scope:` around a handler body.

    A QAServeError aborts the RPC with its status and details; any other exception is logged with its traceback
    and aborts with a generic INTERNAL. The duration is recorded under the code the client got.
    """

    def __init__(self, metrics: Metrics, method: str, context: grpc.aio.ServicerContext, model: str) -> None:
        self.metrics = metrics
        self.method = method
        self.context = context
        self.model = model
        self.code = "OK"
        self._started = 0.0

    def deadline(self) -> float | None:
        """The client's deadline on the event loop's clock, if it set one."""
        remaining = self.context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    async def __aenter__(self) -> RpcScope:
        self._started = time.perf_counter()
        self.metrics.in_flight.labels(self.method).inc()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.metrics.in_flight.labels(self.method).dec()
        status: grpc.Status | None = None
        if isinstance(error, QAServeError):
            self.code = error.code
            self.metrics.errors.labels(error.reason).inc()
            status = to_status(error)
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.code = "CANCELLED"
        elif error is not None and not _is_abort(error):
            log.error("%s failed", self.method, exc_info=(kind, error, tb))  # type: ignore[arg-type]
            self.code = "INTERNAL"
            self.metrics.errors.labels("INTERNAL").inc()
            status = internal_status()
        self.metrics.request_duration.labels(self.method, self.model, self.code).observe(
            time.perf_counter() - self._started
        )
        if status is not None:
            await self.context.abort_with_status(status)
        return False


def _is_abort(error: BaseException) -> bool:
    """grpc.aio raises an AbortError out of context.abort(); it must pass through untouched."""
    return type(error).__name__ == "AbortError"
