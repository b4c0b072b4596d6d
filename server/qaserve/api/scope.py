"""Per-call bookkeeping (gRPC and HTTP): request id, in-flight gauge, duration by method/model/code, the request's
debug log line, and turning errors into statuses."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import re
import time
import uuid
from types import TracebackType

import grpc

from qaserve import logs, tracing
from qaserve.api.errors import ErrorStatus, abort, error_status, is_abort
from qaserve.metrics import Metrics
from qaserve.qa import Timing

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# An incoming id is kept when it is short printable ASCII (it goes into logs); otherwise the server makes one.
_VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


class CallScope:
    """One call of any door: request id, in-flight gauge, duration by method/model/code and the debug log line.

    begin() takes the client's request id (`incoming`, when valid) or makes one and puts it into every log record
    of the call; end() maps the error the call ended with (None: OK) through api/errors.py and records the call.
    """

    def __init__(self, metrics: Metrics, method: str, model: str, incoming: str = "", peer: str = "") -> None:
        self.metrics = metrics
        self.method = method
        self.model = model
        self.code = "OK"
        self.request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else ""
        self.peer = peer
        self.timing: Timing | None = None
        self._started = 0.0
        self._log_context: contextvars.Token[str] | None = None

    def begin(self) -> None:
        self._started = time.perf_counter()
        self.request_id = self.request_id or uuid.uuid4().hex
        self._log_context = logs.request_id.set(self.request_id)
        tracing.tag_request(self.request_id)
        self.metrics.in_flight.labels(self.method).inc()

    def end(self, error: BaseException | None) -> ErrorStatus | None:
        """Records the call; returns what the client is to be told of `error` (None: nothing more to tell)."""
        self.metrics.in_flight.labels(self.method).dec()
        failure: ErrorStatus | None = None
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.code = "CANCELLED"
        elif error is not None and not is_abort(error):
            failure = error_status(error, self.metrics, self.method)
            self.code = failure.code.name
        duration = time.perf_counter() - self._started
        self.metrics.request_duration.labels(self.method, self.model, self.code).observe(duration)
        if log.isEnabledFor(logging.DEBUG):
            self._log(duration)
        self._reset_log_context()
        return failure

    def _log(self, duration: float) -> None:
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "rpc": self.method,
            "model": self.model,
            "code": self.code,
            "duration_ms": round(duration * 1000, 3),
            "peer": self.peer,
        }
        stages = ""
        if self.timing is not None:
            for stage, seconds in dataclasses.asdict(self.timing).items():
                if stage != "total":
                    fields[f"{stage}_ms"] = round(seconds * 1000, 3)
                    stages += f" {stage}_ms={seconds * 1000:.2f}"
        log.debug(
            "%s model=%s code=%s duration_ms=%.2f%s request_id=%s",
            self.method,
            self.model,
            self.code,
            duration * 1000,
            stages,
            self.request_id,
            extra=fields,
        )

    def _reset_log_context(self) -> None:
        if self._log_context is None:
            return
        # ValueError: an async generator closed from another context, which ends with its own task anyway.
        with contextlib.suppress(ValueError):
            logs.request_id.reset(self._log_context)
        self._log_context = None


class RpcScope(CallScope):
    """`async with RpcScope(...) as scope:` around a gRPC handler body.

    An exception ends the RPC with the status api/errors.py maps it to (a generic INTERNAL for unexpected ones,
    logged with their traceback). The duration is recorded under the code the client got.

    The request id is the client's `x-request-id` metadata or a new one; it goes back in the trailing metadata and
    into every log record of the request. At DEBUG each RPC logs one line: id, method, model, code, timings
    (the stages of `timing` when the handler sets it).
    """

    def __init__(self, metrics: Metrics, method: str, context: grpc.aio.ServicerContext, model: str) -> None:
        super().__init__(metrics, method, model, _incoming_request_id(context), context.peer())
        self.context = context

    def deadline(self) -> float | None:
        """The client's deadline on the event loop's clock, if it set one."""
        remaining = self.context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    async def __aenter__(self) -> RpcScope:
        self.begin()
        self.context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        failure = self.end(error)
        if failure is not None:
            # Aborting replaces the trailing metadata: the request id goes along with the status details.
            await abort(self.context, failure, ((REQUEST_ID_KEY, self.request_id),))


def _incoming_request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return value
    return ""
