"""Client library for the qaserve extractive question-answering gRPC server."""

from qaserve_client._version import __version__
from qaserve_client.channel import create_aio_channel, create_channel, tls_credentials
from qaserve_client.client import CLIENT_TIMEOUT, DEFAULT_TARGET, DEFAULT_TIMEOUT, AsyncQAClient, QAClient
from qaserve_client.errors import REQUEST_ID_KEY, QAServeError
from qaserve_client.items import ManyItem
from qaserve_client.models import ModelInfo
from qaserve_client.options import AnswerOptions, AnswerOptionsFields, Passage, ReadOptions, ReadOptionsFields
from qaserve_client.results import (
    Answer,
    AnswerResult,
    ManyResult,
    ModelRef,
    PassageAnswer,
    Progress,
    ReadResult,
    ServerTiming,
)

__all__ = [
    "CLIENT_TIMEOUT",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "REQUEST_ID_KEY",
    "Answer",
    "AnswerOptions",
    "AnswerOptionsFields",
    "AnswerResult",
    "AsyncQAClient",
    "ManyItem",
    "ManyResult",
    "ModelInfo",
    "ModelRef",
    "Passage",
    "PassageAnswer",
    "Progress",
    "QAClient",
    "QAServeError",
    "ReadOptions",
    "ReadOptionsFields",
    "ReadResult",
    "ServerTiming",
    "__version__",
    "create_aio_channel",
    "create_channel",
    "tls_credentials",
]
