"""Client library for the qaserve extractive question-answering gRPC server."""

from qaserve_client.client import DEFAULT_TARGET, DEFAULT_TIMEOUT, AsyncQAClient, QAClient
from qaserve_client.errors import QAServeError
from qaserve_client.results import Answer, AnswerResult, ModelRef, ServerTiming

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "Answer",
    "AnswerResult",
    "AsyncQAClient",
    "ModelRef",
    "QAClient",
    "QAServeError",
    "ServerTiming",
]
