"""QAClient and AsyncQAClient: the qaserve.v1 RPCs and gRPC health checks over grpc and grpc.aio."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Generator, Iterable, Iterator
from types import TracebackType
from typing import Final, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qaserve_client.channel import create_aio_channel, create_channel
from qaserve_client.converters import (
    build_many_request,
    build_request,
    result_from_many,
    result_from_response,
    update_from_progressive,
)
from qaserve_client.errors import QAServeError, error_from_rpc
from qaserve_client.items import ManyItem
from qaserve_client.models import LOAD_TIMEOUT, ModelInfo, model_info
from qaserve_client.results import AnswerResult, ManyResult, Progress
from qaserve_client.v1 import model_service_pb2 as models_pb
from qaserve_client.v1 import model_service_pb2_grpc as models_pb_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 10.0


class ClientTimeout(enum.Enum):
    """The type of CLIENT_TIMEOUT."""

    CLIENT_TIMEOUT = "the client's timeout"


CLIENT_TIMEOUT: Final = ClientTimeout.CLIENT_TIMEOUT
"""The default `timeout` of the streaming calls: the client's timeout, as the deadline of the whole stream."""


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return name


def _stream_deadline(timeout: float | ClientTimeout | None, client_timeout: float) -> float | None:
    return client_timeout if timeout is CLIENT_TIMEOUT else timeout


def _no_final_answer() -> QAServeError:
    return QAServeError(grpc.StatusCode.INTERNAL, "the AnswerProgressive stream ended without a final answer")


class _ManyRequests:
    """The requests of one AnswerMany call, built from the caller's items as grpc takes them.

    grpc takes them on a thread or task of its own, where an exception from the items would be logged and turn
    into a cancelled call. Instead the requests end there, and raise_error re-raises it to the caller.
    """

    def __init__(self) -> None:
        self._error: Exception | None = None

    def of(self, items: Iterable[ManyItem]) -> Iterator[pb.AnswerManyRequest]:
        try:
            for item in items:
                yield build_many_request(item)
        except Exception as error:
            self._error = error

    async def of_async(self, items: AsyncIterable[ManyItem]) -> AsyncIterator[pb.AnswerManyRequest]:
        try:
            async for item in items:
                yield build_many_request(item)
        except Exception as error:
            self._error = error

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


class QAClient:
    """Blocking client for a qaserve server.

    Every call carries a deadline: the call's `timeout` argument or else the client's `timeout`, in seconds;
    for the streaming calls it bounds the whole stream, and they alone accept timeout=None for no deadline.
    Failed calls raise QAServeError. Use as a context manager, or call close(), to release the channel.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        """Connects to `target`: "host:port", or "dns:///name:port" to spread calls over every address of the
        name (round_robin); calls failing with UNAVAILABLE are retried (see qaserve_client.channel).

        Over TLS when `credentials` are given (tls_credentials(ca_file, cert_file, key_file)); `token` is sent
        as `authorization: Bearer <token>` on every call. A `channel` passed in is used instead of `target`,
        `credentials` and `token`; it stays open on close(), since its owner may share it.
        """
        self._timeout = timeout
        self._owns_channel = channel is None
        if channel is None:
            channel = create_channel(target, credentials=credentials, token=token)
        self._channel = channel
        self._stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        self._health_stub = health_pb2_grpc.HealthStub(channel)
        self._models_stub = models_pb_grpc.ModelServiceStub(channel)

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

    def answer_progressive(
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
        timeout: float | ClientTimeout | None = CLIENT_TIMEOUT,
    ) -> Generator[Progress | AnswerResult, None, None]:
        """Answers like answer(), yielding a Progress after each group of scored windows, then the AnswerResult.

        The last item is always the AnswerResult, equal to what answer() returns; a one-window context yields
        only that. The call starts on the first next(); closing the iterator early cancels it, and the server
        drops the remaining windows.

        `timeout` is the deadline of the whole stream, in seconds: by default the client's timeout, None for
        no deadline (unlike answer(), where None means the client's timeout). A failed call raises
        QAServeError from the iterator, possibly after some Progress items.
        """
        request = pb.AnswerProgressiveRequest(
            request=build_request(
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
        )
        call = self._stub.AnswerProgressive(request, timeout=_stream_deadline(timeout, self._timeout))
        try:
            for response in call:
                update = update_from_progressive(response)
                if update is None:
                    continue
                yield update
                if isinstance(update, AnswerResult):
                    return
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            call.cancel()
        raise _no_final_answer()

    def answer_many(
        self,
        items: Iterable[ManyItem],
        *,
        timeout: float | ClientTimeout | None = CLIENT_TIMEOUT,
    ) -> Generator[ManyResult, None, None]:
        """Answers every item on one AnswerMany stream, yielding a ManyResult for each as soon as it is ready.

        Results come in no guaranteed order; match them to items by id. A failed item yields a ManyResult with
        its `error` set and the stream goes on. `items` may be lazy: grpc takes them on a thread of its own as
        the server accepts more; an exception they raise ends the stream and is raised here. The server takes
        only a bounded number of items ahead of the results read, so read the results as they come.

        `timeout` is the deadline of the whole stream, in seconds: by default the client's timeout, None for
        no deadline (unlike answer(), where None means the client's timeout); give a long stream a long one.
        A failure of the stream itself (connection, deadline) raises QAServeError from the iterator. The call
        starts on the first next(); closing the iterator early cancels it.
        """
        requests = _ManyRequests()
        call = self._stub.AnswerMany(requests.of(items), timeout=_stream_deadline(timeout, self._timeout))
        try:
            for response in call:
                requests.raise_error()
                yield result_from_many(response)
            requests.raise_error()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            call.cancel()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server is configured with, the default first."""
        try:
            response = self._models_stub.ListModels(models_pb.ListModelsRequest(), timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return [model_info(m) for m in response.models]

    def get_model(self, name: str = "", *, timeout: float | None = None) -> ModelInfo:
        """One configured model ("" = the default)."""
        try:
            response = self._models_stub.GetModel(models_pb.GetModelRequest(name=name), timeout=self._deadline(timeout))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return model_info(response.model)

    def load_model(self, name: str = "", *, timeout: float = LOAD_TIMEOUT) -> ModelInfo:
        """Loads a configured model (retrying a failed one) and returns it once ready."""
        try:
            response = self._models_stub.LoadModel(models_pb.LoadModelRequest(name=name), timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return model_info(response.model)

    def unload_model(self, name: str, *, timeout: float = LOAD_TIMEOUT) -> ModelInfo:
        """Unloads a model once its in-flight requests finish; a pinned model refuses (FAILED_PRECONDITION)."""
        try:
            response = self._models_stub.UnloadModel(models_pb.UnloadModelRequest(name=name), timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return model_info(response.model)

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

    The streaming calls return async iterators, for `async for`.

    Create it inside the event loop it will be used on.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        """Connects to `target`: "host:port", or "dns:///name:port" to spread calls over every address of the
        name (round_robin); calls failing with UNAVAILABLE are retried (see qaserve_client.channel).

        Over TLS when `credentials` are given (tls_credentials(ca_file, cert_file, key_file)); `token` is sent
        as `authorization: Bearer <token>` on every call. A `channel` passed in is used instead of `target`,
        `credentials` and `token`; it stays open on close(), since its owner may share it.
        """
        self._timeout = timeout
        self._owns_channel = channel is None
        if channel is None:
            channel = create_aio_channel(target, credentials=credentials, token=token)
        self._channel = channel
        self._stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        self._health_stub = health_pb2_grpc.HealthStub(channel)
        self._models_stub = models_pb_grpc.ModelServiceStub(channel)

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

    async def answer_progressive(
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
        timeout: float | ClientTimeout | None = CLIENT_TIMEOUT,  # noqa: ASYNC109
    ) -> AsyncGenerator[Progress | AnswerResult, None]:
        """Answers like answer(), yielding a Progress after each group of scored windows, then the AnswerResult.

        Use with `async for`. The last item is always the AnswerResult, equal to what answer() returns; a
        one-window context yields only that. The call starts on the first iteration; closing the iterator early
        (contextlib.aclosing) cancels it, and the server drops the remaining windows.

        `timeout` is the deadline of the whole stream, in seconds: by default the client's timeout, None for
        no deadline (unlike answer(), where None means the client's timeout). A failed call raises
        QAServeError from the iterator, possibly after some Progress items.
        """
        request = pb.AnswerProgressiveRequest(
            request=build_request(
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
        )
        call = self._stub.AnswerProgressive(request, timeout=_stream_deadline(timeout, self._timeout))
        try:
            async for response in call:
                update = update_from_progressive(response)
                if update is None:
                    continue
                yield update
                if isinstance(update, AnswerResult):
                    return
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            call.cancel()
        raise _no_final_answer()

    async def answer_many(
        self,
        items: Iterable[ManyItem] | AsyncIterable[ManyItem],
        *,
        timeout: float | ClientTimeout | None = CLIENT_TIMEOUT,  # noqa: ASYNC109
    ) -> AsyncGenerator[ManyResult, None]:
        """Answers every item on one AnswerMany stream, yielding a ManyResult for each as soon as it is ready.

        Use with `async for`. Results come in no guaranteed order; match them to items by id. A failed item
        yields a ManyResult with its `error` set and the stream goes on. `items` may be an async iterable, taken
        as the server accepts more; a plain iterable is taken on the event loop, so it must not block. An
        exception the items raise ends the stream and is raised here. The server takes only a bounded number of
        items ahead of the results read, so read the results as they come.

        `timeout` is the deadline of the whole stream, in seconds: by default the client's timeout, None for
        no deadline (unlike answer(), where None means the client's timeout); give a long stream a long one.
        A failure of the stream itself (connection, deadline) raises QAServeError from the iterator.
        """
        requests = _ManyRequests()
        request_iterator = requests.of_async(items) if isinstance(items, AsyncIterable) else requests.of(items)
        call = self._stub.AnswerMany(request_iterator, timeout=_stream_deadline(timeout, self._timeout))
        try:
            async for response in call:
                requests.raise_error()
                yield result_from_many(response)
            requests.raise_error()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:  # noqa: ASYNC109
        """Every model the server is configured with, the default first."""
        try:
            response = await self._models_stub.ListModels(
                models_pb.ListModelsRequest(), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return [model_info(m) for m in response.models]

    async def get_model(self, name: str = "", *, timeout: float | None = None) -> ModelInfo:  # noqa: ASYNC109
        """One configured model ("" = the default)."""
        try:
            response = await self._models_stub.GetModel(
                models_pb.GetModelRequest(name=name), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return model_info(response.model)

    async def load_model(self, name: str = "", *, timeout: float = LOAD_TIMEOUT) -> ModelInfo:  # noqa: ASYNC109
        """Loads a configured model (retrying a failed one) and returns it once ready."""
        try:
            response = await self._models_stub.LoadModel(models_pb.LoadModelRequest(name=name), timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return model_info(response.model)

    async def unload_model(self, name: str, *, timeout: float = LOAD_TIMEOUT) -> ModelInfo:  # noqa: ASYNC109
        """Unloads a model once its in-flight requests finish; a pinned model refuses (FAILED_PRECONDITION)."""
        try:
            response = await self._models_stub.UnloadModel(models_pb.UnloadModelRequest(name=name), timeout=timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        return model_info(response.model)

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
