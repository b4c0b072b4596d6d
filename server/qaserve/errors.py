"""Domain errors: each names its gRPC status code and a stable UPPER_SNAKE reason; api/errors.py maps them."""

from __future__ import annotations

import re
from collections.abc import Iterable

# How much of a client-supplied value an error message repeats: the message also travels in the grpc-message
# header and again inside grpc-status-details-bin, and a client refuses response headers over 16 KiB.
ECHO_CHARS = 64
# How many configured model names a ModelNotFound lists.
LISTED_MODELS = 10


def shorten(value: str, limit: int = ECHO_CHARS) -> str:
    """`value` as an error message may repeat it: at most `limit` characters, marked when cut."""
    return value if len(value) <= limit else f"{value[: limit - 3]}..."


class QAServeError(Exception):
    """Base of every error a client may see; the message is safe to send."""

    code = "INTERNAL"
    reason = "INTERNAL"
    # The HTTP status where the gRPC code's (api/errors.py) does not fit what went wrong on the HTTP wire.
    http_status: int | None = None

    @classmethod
    def reasons(cls) -> tuple[str, ...]:
        """The reasons errors of this class carry."""
        return (cls.reason,)


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

    def __init__(self, name: str, configured: Iterable[str] = ()) -> None:
        names = sorted(configured)
        listed = ", ".join(shorten(n) for n in names[:LISTED_MODELS])
        if len(names) > LISTED_MODELS:
            listed += f" and {len(names) - LISTED_MODELS} more"
        hint = f"; configured models: {listed}" if names else ""
        super().__init__(f"model {shorten(name)!r} is not configured on this server{hint}")
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


class MalformedRequest(QAServeError):
    """The request bytes are not a valid message of the method's request type."""

    code = "INTERNAL"
    reason = "MALFORMED_REQUEST"

    def __init__(self) -> None:
        super().__init__("the request could not be parsed as the method's request message")


class MalformedJson(InvalidArgument):
    """An HTTP request body that is not JSON (or not UTF-8)."""

    reason = "MALFORMED_JSON"

    def __init__(self, description: str) -> None:
        super().__init__("body", description)


class UnsupportedMediaType(InvalidArgument):
    """An HTTP request body of a content type the route does not read."""

    reason = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415

    def __init__(self, given: str, accepted: str) -> None:
        super().__init__("Content-Type", f"{shorten(given) or 'none'} is not accepted here; send {accepted}")


class BodyTooLarge(QAServeError):
    """An HTTP request body over the server's size limit (--max-receive-message-bytes)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "BODY_TOO_LARGE"
    http_status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than this server accepts ({limit} bytes)")


class HeadersTooLarge(QAServeError):
    """HTTP request headers over the server's limit."""

    code = "RESOURCE_EXHAUSTED"
    reason = "HEADERS_TOO_LARGE"
    http_status = 431

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request headers are larger than this server accepts ({limit} bytes)")


class SlowRequest(QAServeError):
    """An HTTP client that did not send its request body within the read timeout."""

    code = "DEADLINE_EXCEEDED"
    reason = "REQUEST_TIMEOUT"
    http_status = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s")


class RouteNotFound(QAServeError):
    """An HTTP path or method the server does not serve."""

    code = "NOT_FOUND"
    reason = "ROUTE_NOT_FOUND"

    def __init__(self, method: str, path: str) -> None:
        super().__init__(f"no route {method} {shorten(path)}; GET /openapi.json lists the routes")


class Unauthenticated(QAServeError):
    """The call carries no bearer token (MISSING_TOKEN), or one the server does not accept (INVALID_TOKEN)."""

    code = "UNAUTHENTICATED"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    @classmethod
    def reasons(cls) -> tuple[str, ...]:
        return ("MISSING_TOKEN", "INVALID_TOKEN")


def error_reasons() -> list[str]:
    """Every ErrorInfo reason a client may get from qaserve, INTERNAL (an unexpected error's) included."""
    reasons: set[str] = set()
    classes: list[type[QAServeError]] = [QAServeError]
    while classes:
        cls = classes.pop()
        reasons.update(cls.reasons())
        classes.extend(cls.__subclasses__())
    return sorted(reasons)


# Absolute paths (POSIX, or a Windows drive) and home-relative ones: what a load failure's text may carry of the
# host's filesystem (the model directory, the hub cache, site-packages, temporary files).
_PATH = re.compile(r"(?<![\w.:~/\\>-])(?:~|[A-Za-z]:)?[\\/][^\s'\"`,;()<>\[\]{}]+")


def first_line(error: BaseException) -> str:
    """The first line of an exception's text (a library's can run to pages), or its type's name where it has none:
    what a message about a failure quotes of it."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def redact_host_details(text: str, sources: Iterable[str] = ()) -> str:
    """`text` without what is specific to this host: the configured `sources` (directories or hub ids) become
    `<model source>`, and every other filesystem path (model files, the hub cache, temporary files) `<path>`."""
    for source in sorted({s for s in sources if s}, key=len, reverse=True):
        text = text.replace(source, "<model source>")
    return _PATH.sub("<path>", text)
