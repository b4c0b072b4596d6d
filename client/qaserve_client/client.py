"""QAClient and AsyncQAClient: the qaserve.v1 RPCs and gRPC health checks over grpc and grpc.aio."""

from __future__ import annotations

import enum
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from types import TracebackType
from typing import Final, Self, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qaserve_client.channel import create_aio_channel, create_channel
from qaserve_client.converters import (
    many_request,
    result_from_many,
    result_from_read,
    result_from_response,
    update_from_progressive,
)
from qaserve_client.errors import QAServeError, error_from_rpc
from qaserve_client.items import ManyItem
from qaserve_client.models import LOAD_TIMEOUT, ModelInfo, model_info
from qaserve_client.options import (
    AnswerOptions,
    AnswerOptionsFields,
    Passage,
    ReadOptions,
    ReadOptionsFields,
    answer_request,
    read_request,
    resolve_options,
)
from qaserve_client.results import AnswerResult, ManyResult, Progress, ReadResult
from qaserve_client.v1 import model_service_pb2 as models_pb
from qaserve_client.v1 import model_service_pb2_grpc as models_pb_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 10.0

Metadata = Sequence[tuple[str, str]]
"""gRPC metadata: (key, value) pairs, keys in lower case; `x-request-id` chooses the call's request id."""

_R = TypeVar("_R")


class ClientTimeout(enum.Enum):
    """The type of CLIENT_TIMEOUT."""

    CLIENT_TIMEOUT = "the client's timeout"


CLIENT_TIMEOUT: Final = ClientTimeout.CLIENT_TIMEOUT
"""The default `timeout` of the streaming calls: the client's timeout, as the deadline of the whole stream."""


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return name


def _no_final_answer() -> QAServeError:
    return QAServeError(grpc.StatusCode.INTERNAL, "the AnswerProgressive stream ended without a final answer")


def _progressive_request(
    question: str, context: str, options: AnswerOptions | None, fields: AnswerOptionsFields
) -> pb.AnswerProgressiveRequest:
    resolved = resolve_options(options, fields, AnswerOptions)
    return pb.AnswerProgressiveRequest(request=answer_request(question, context, resolved))


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
                yield many_request(item)
        except Exception as error:
            self._error = error

    async def of_async(self, items: AsyncIterable[ManyItem]) -> AsyncIterator[pb.AnswerManyRequest]:
        try:
            async for item in items:
                yield many_request(item)
        except Exception as error:
            self._error = error

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


class _Client:
    """What QAClient and AsyncQAClient share: stubs, deadlines and the metadata every call carries."""

    def __init__(
        self, channel: grpc.Channel | grpc.aio.Channel, timeout: float, owns_channel: bool, metadata: Metadata
    ) -> None:
        self._timeout = timeout
        self._owns_channel = owns_channel
        self._metadata = tuple(metadata)
        self._stub = pb_grpc.QuestionAnsweringServiceStub(channel)
        self._health_stub = health_pb2_grpc.HealthStub(channel)
        self._models_stub = models_pb_grpc.ModelServiceStub(channel)

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout

    def _stream_deadline(self, timeout: float | ClientTimeout | None) -> float | None:
        return self._timeout if timeout is CLIENT_TIMEOUT else timeout

    def _call_metadata(self, metadata: Metadata) -> tuple[tuple[str, str], ...] | None:
        return (*self._metadata, *metadata) or None


_CONNECT_DOC = """Connects to `target`: "host:port", or "dns:///name:port" to spread calls over every address of the
        name (round_robin); calls failing with UNAVAILABLE are retried (see qaserve_client.channel).

        Over TLS when `credentials` are given (tls_credentials(ca_file, cert_file, key_file)); `token` is sent
        as `authorization: Bearer <token>` on every call, and `metadata` (key, value) pairs too. A `channel`
        passed in is used instead of `target`, `credentials` and `token`; it stays open on close(), since its
        owner may share it.
        """


class QAClient(_Client):
    """Blocking client for a qaserve server.

    Every call carries a deadline: the call's `timeout` argument or else the client's `timeout`, in seconds;
    for the streaming calls it bounds the whole stream, and they alone accept timeout=None for no deadline.
    Every call also takes `metadata`, sent after the client's own: [("x-request-id", "...")] chooses the id
    that the result's `request_id` and the server's logs carry. Failed calls raise QAServeError. Use as a
    context manager, or call close(), to release the channel.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        metadata: Metadata = (),
    ) -> None:
        owns_channel = channel is None
        if channel is None:
            channel = create_channel(target, credentials=credentials, token=token)
        self._channel = channel
        super().__init__(channel, timeout, owns_channel, metadata)

    __init__.__doc__ = _CONNECT_DOC

    def answer(
        self,
        question: str,
        context: str,
        options: AnswerOptions | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **fields: Unpack[AnswerOptionsFields],
    ) -> AnswerResult:
        """Answers `question` from `context` with the best spans, highest score first.

        `options` and the AnswerOptions fields given as keyword arguments (top_k=3, model="name") say how;
        keyword arguments win. An option left None is not sent, and the server applies its documented default.
        `timeout` None uses the client's.
        """
        request = answer_request(question, context, resolve_options(options, fields, AnswerOptions))
        return result_from_response(self._unary(self._stub.Answer, request, timeout, metadata))

    def read(
        self,
        question: str,
        passages: Sequence[str | Passage],
        options: ReadOptions | None = None,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **fields: Unpack[ReadOptionsFields],
    ) -> ReadResult:
        """Reads `passages` (texts, or Passage(text, id)) for `question`: the best answers across all of them,
        highest score first, each naming its passage by index and id.

        `options` and the ReadOptions fields given as keyword arguments (top_k=5, score_mode="pipeline") say
        how; keyword arguments win. `timeout` None uses the client's.
        """
        request = read_request(question, passages, resolve_options(options, fields, ReadOptions))
        return result_from_read(self._unary(self._stub.Read, request, timeout, metadata))

    def answer_progressive(
        self,
        question: str,
        context: str,
        options: AnswerOptions | None = None,
        *,
        timeout: float | ClientTimeout | None = CLIENT_TIMEOUT,
        metadata: Metadata = (),
        **fields: Unpack[AnswerOptionsFields],
    ) -> Generator[Progress | AnswerResult, None, None]:
        """Answers like answer(), yielding a Progress after each group of scored windows, then the AnswerResult.

        The last item is always the AnswerResult, equal to what answer() returns; a one-window context yields
        only that. The call starts on the first next(); closing the iterator early cancels it, and the server
        drops the remaining windows.

        `timeout` is the deadline of the whole stream, in seconds: by default the client's timeout, None for
        no deadline (unlike answer(), where None means the client's timeout). A failed call raises
        QAServeError from the iterator, possibly after some Progress items.
        """
        request = _progressive_request(question, context, options, fields)
        call = self._stub.AnswerProgressive(
            request, timeout=self._stream_deadline(timeout), metadata=self._call_metadata(metadata)
        )
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
        metadata: Metadata = (),
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
        call = self._stub.AnswerMany(
            requests.of(items), timeout=self._stream_deadline(timeout), metadata=self._call_metadata(metadata)
        )
        try:
            for response in call:
                requests.raise_error()
                yield result_from_many(response)
            requests.raise_error()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            call.cancel()

    def list_models(self, *, timeout: float | None = None, metadata: Metadata = ()) -> list[ModelInfo]:
        """Every model the server is configured with, the default first."""
        response = self._unary(self._models_stub.ListModels, models_pb.ListModelsRequest(), timeout, metadata)
        return [model_info(m) for m in response.models]

    def get_model(self, name: str = "", *, timeout: float | None = None, metadata: Metadata = ()) -> ModelInfo:
        """One configured model ("" = the default)."""
        request = models_pb.GetModelRequest(name=name)
        return model_info(self._unary(self._models_stub.GetModel, request, timeout, metadata).model)

    def load_model(self, name: str = "", *, timeout: float = LOAD_TIMEOUT, metadata: Metadata = ()) -> ModelInfo:
        """Loads a configured model (retrying a failed one) and returns it once ready."""
        request = models_pb.LoadModelRequest(name=name)
        return model_info(self._unary(self._models_stub.LoadModel, request, timeout, metadata).model)

    def unload_model(self, name: str, *, timeout: float = LOAD_TIMEOUT, metadata: Metadata = ()) -> ModelInfo:
        """Unloads a model once its in-flight requests finish; a pinned model refuses (FAILED_PRECONDITION)."""
        request = models_pb.UnloadModelRequest(name=name)
        return model_info(self._unary(self._models_stub.UnloadModel, request, timeout, metadata).model)

    def health(self, service: str = "", *, timeout: float | None = None, metadata: Metadata = ()) -> str:
        """Returns the grpc.health.v1 status of `service` ("" for the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(self._unary(self._health_stub.Check, request, timeout, metadata))

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

    def _unary(self, method: Callable[..., _R], request: object, timeout: float | None, metadata: Metadata) -> _R:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._call_metadata(metadata))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error


class AsyncQAClient(_Client):
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
        metadata: Metadata = (),
    ) -> None:
        owns_channel = channel is None
        if channel is None:
            channel = create_aio_channel(target, credentials=credentials, token=token)
        self._channel = channel
        super().__init__(channel, timeout, owns_channel, metadata)

    __init__.__doc__ = _CONNECT_DOC

    async def answer(
        self,
        question: str,
        context: str,
        options: AnswerOptions | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
        **fields: Unpack[AnswerOptionsFields],
    ) -> AnswerResult:
        """Answers `question` from `context` with the best spans, highest score first; see QAClient.answer."""
        request = answer_request(question, context, resolve_options(options, fields, AnswerOptions))
        return result_from_response(await self._unary(self._stub.Answer, request, timeout, metadata))

    async def read(
        self,
        question: str,
        passages: Sequence[str | Passage],
        options: ReadOptions | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
        **fields: Unpack[ReadOptionsFields],
    ) -> ReadResult:
        """Reads `passages` for `question`: the best answers across all of them; see QAClient.read."""
        request = read_request(question, passages, resolve_options(options, fields, ReadOptions))
        return result_from_read(await self._unary(self._stub.Read, request, timeout, metadata))

    async def answer_progressive(
        self,
        question: str,
        context: str,
        options: AnswerOptions | None = None,
        *,
        timeout: float | ClientTimeout | None = CLIENT_TIMEOUT,  # noqa: ASYNC109
        metadata: Metadata = (),
        **fields: Unpack[AnswerOptionsFields],
    ) -> AsyncGenerator[Progress | AnswerResult, None]:
        """Answers like answer(), yielding a Progress after each group of scored windows, then the AnswerResult.

        Use with `async for`. The last item is always the AnswerResult, equal to what answer() returns; a
        one-window context yields only that. The call starts on the first iteration; closing the iterator early
        (contextlib.aclosing) cancels it, and the server drops the remaining windows.

        `timeout` is the deadline of the whole stream, in seconds: by default the client's timeout, None for
        no deadline (unlike answer(), where None means the client's timeout). A failed call raises
        QAServeError from the iterator, possibly after some Progress items.
        """
        request = _progressive_request(question, context, options, fields)
        call = self._stub.AnswerProgressive(
            request, timeout=self._stream_deadline(timeout), metadata=self._call_metadata(metadata)
        )
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
        metadata: Metadata = (),
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
        call = self._stub.AnswerMany(
            request_iterator, timeout=self._stream_deadline(timeout), metadata=self._call_metadata(metadata)
        )
        try:
            async for response in call:
                requests.raise_error()
                yield result_from_many(response)
            requests.raise_error()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            call.cancel()

    async def list_models(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> list[ModelInfo]:
        """Every model the server is configured with, the default first."""
        request = models_pb.ListModelsRequest()
        response = await self._unary(self._models_stub.ListModels, request, timeout, metadata)
        return [model_info(m) for m in response.models]

    async def get_model(
        self,
        name: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> ModelInfo:
        """One configured model ("" = the default)."""
        request = models_pb.GetModelRequest(name=name)
        return model_info((await self._unary(self._models_stub.GetModel, request, timeout, metadata)).model)

    async def load_model(
        self,
        name: str = "",
        *,
        timeout: float = LOAD_TIMEOUT,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> ModelInfo:
        """Loads a configured model (retrying a failed one) and returns it once ready."""
        request = models_pb.LoadModelRequest(name=name)
        return model_info((await self._unary(self._models_stub.LoadModel, request, timeout, metadata)).model)

    async def unload_model(
        self,
        name: str,
        *,
        timeout: float = LOAD_TIMEOUT,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> ModelInfo:
        """Unloads a model once its in-flight requests finish; a pinned model refuses (FAILED_PRECONDITION)."""
        request = models_pb.UnloadModelRequest(name=name)
        return model_info((await self._unary(self._models_stub.UnloadModel, request, timeout, metadata)).model)

    async def health(
        self,
        service: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> str:
        """Returns the grpc.health.v1 status of `service` ("" for the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(await self._unary(self._health_stub.Check, request, timeout, metadata))

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

    async def _unary(
        self,
        method: Callable[..., Awaitable[_R]],
        request: object,
        timeout: float | None,  # noqa: ASYNC109
        metadata: Metadata,
    ) -> _R:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._call_metadata(metadata))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
