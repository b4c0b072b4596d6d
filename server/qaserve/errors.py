"""Domain errors: each names its gRPC status code and a stable UPPER_SNAKE reason; api/errors.py maps them."""

from __future__ import annotations


class QAServeError(Exception):
    """Base of every error a client may see; the message is safe to send."""

    code = "INTERNAL"
    reason = "INTERNAL"


class InvalidArgument(QAServeError):
    """A request field is out of its documented range."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class ModelNotFound(QAServeError):
    """The request names a model the server is not configured with."""

    code = "NOT_FOUND"
    reason = "MODEL_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} is not configured on this server")
        self.name = name


class ModelNotReady(QAServeError):
    """The model exists but cannot serve: still loading, or its load failed."""

    code = "UNAVAILABLE"
    reason = "MODEL_NOT_READY"


class ModelFailed(QAServeError):
    """The model's last load failed; LoadModel retries it."""

    code = "FAILED_PRECONDITION"
    reason = "MODEL_LOAD_FAILED"


class ModelPinned(QAServeError):
    """A pinned model cannot be unloaded."""

    code = "FAILED_PRECONDITION"
    reason = "MODEL_PINNED"


class ModelTooLarge(QAServeError):
    """The model does not fit in the cache even after evicting every unpinned model."""

    code = "RESOURCE_EXHAUSTED"
    reason = "MODEL_CACHE_FULL"


class Overloaded(QAServeError):
    """Admission is full; the client should retry after `retry_after` seconds."""

    code = "RESOURCE_EXHAUSTED"
    reason = "OVERLOADED"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineTooShort(QAServeError):
    """The request's deadline passed, or will pass before its windows can run."""

    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_TOO_SHORT"


class ShuttingDown(QAServeError):
    """The server is draining and takes no new work."""

    code = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"


class InferenceFailed(QAServeError):
    """A forward pass raised; the cause is logged, never sent."""

    code = "INTERNAL"
    reason = "INFERENCE_FAILED"
