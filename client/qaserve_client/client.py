"""QAClient and AsyncQAClient: the qaserve.v1 Answer RPC and gRPC health checks over grpc and grpc.aio."""

from __future__ import annotations

from importlib import metadata
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qaserve_client.converters import build_request, result_from_response
from qaserve_client.errors import error_from_rpc
from qaserve_client.results import AnswerResult
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 10.0


def _user_agent() -> str:
    try:
        return f"qaserve-client/{metadata.version('qaserve-client')}"
    except metadata.PackageNotFoundError:
        return "qaserve-client"


def _channel_options() -> list[tuple[str, str | int]]:
    return [
        ("grpc.primary_user_agent", _user_agent()),
        # Pings only while calls are in flight and no more often than a default gRPC server accepts
        # (grpc.http2.min_ping_interval_without_data_ms, 5 minutes), so a server never answers with
        # GOAWAY "too_many_pings"; they still catch a dead connection under a long-running call.
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return name


class QAClient:
    """Blocking client for a qaserve server.

    Every call carries a deadline: the call's `timeout` argument or else the client's `timeout`, in seconds.
    Failed calls raise QAServeError. Use as a context manager, or call close(), to release the channel.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Connects to `target` (host:port), over TLS when `credentials` are given.

        A `channel` passed in is used instead of `target` and `credentials`; it stays open on close(), since
        its owner may share it.
        """
        self._timeout = timeout
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.insecure_channel(target, options=_channel_options())
            else:
                channel = grpc.secure_channel(target, credentials, options=_channel_options())
        self._channel = channel
        self._stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        self._health_stub = health_pb2_grpc.HealthStub(channel)

    def answer(
        self,
        question: str,
        context: str,
        *,
        model: str = "",
        top_k: int | None = None,
        max_answer_len: int | None = None,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        max_question_len: int | None = None,
        handle_impossible_answer: bool = False,
        align_to_words: bool | None = None,
        timeout: float | None = None,
    ) -> AnswerResult:
        """Answers `question` from `context` with the best spans, highest score first.

        An option left None is not sent, and the server applies its documented default. `model` "" selects
        the server's default model; `timeout` None uses the client's.
        """
        request = build_request(
            question,
            context,
            model=model,
            top_k=top_k,
            max_answer_len=max_answer_len,
            max_seq_len=max_seq_len,
            doc_stride=doc_stride,
            max_question_len=max_question_len,
            handle_impossible_answer=handle_impossible_answer,
            align_to_words=align_to_words,
        )
        try:
            response: pb.AnswerResponse = self._stub.Answer(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return result_from_response(response)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Returns the grpc.health.v1 status of `service` ("" for the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response: health_pb2.HealthCheckResponse = self._health_stub.Check(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return _status_name(response)

    def close(self) -> None:
        """Closes the channel if this client created it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout


class AsyncQAClient:
    """asyncio client for a qaserve server, over grpc.aio; the same API as QAClient with awaitable calls.

    Create it inside the event loop it will be used on.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Connects to `target` (host:port), over TLS when `credentials` are given.

        A `channel` passed in is used instead of `target` and `credentials`; it stays open on close(), since
        its owner may share it.
        """
        self._timeout = timeout
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=_channel_options())
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=_channel_options())
        self._channel = channel
        self._stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        self._health_stub = health_pb2_grpc.HealthStub(channel)

    async def answer(
        self,
        question: str,
        context: str,
        *,
        model: str = "",
        top_k: int | None = None,
        max_answer_len: int | None = None,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        max_question_len: int | None = None,
        handle_impossible_answer: bool = False,
        align_to_words: bool | None = None,
        # A gRPC deadline that travels to the server; a local asyncio.timeout would not.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AnswerResult:
        """Answers `question` from `context` with the best spans, highest score first.

        An option left None is not sent, and the server applies its documented default. `model` "" selects
        the server's default model; `timeout` None uses the client's.
        """
        request = build_request(
            question,
            context,
            model=model,
            top_k=top_k,
            max_answer_len=max_answer_len,
            max_seq_len=max_seq_len,
            doc_stride=doc_stride,
            max_question_len=max_question_len,
            handle_impossible_answer=handle_impossible_answer,
            align_to_words=align_to_words,
        )
        try:
            response: pb.AnswerResponse = await self._stub.Answer(request, timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return result_from_response(response)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """Returns the grpc.health.v1 status of `service` ("" for the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response: health_pb2.HealthCheckResponse = await self._health_stub.Check(
                request, timeout=self._deadline(timeout)
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return _status_name(response)

    async def close(self) -> None:
        """Closes the channel if this client created it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout
