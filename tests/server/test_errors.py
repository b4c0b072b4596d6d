"""The error policy (api/errors.py) and the domain errors' client-facing text (qaserve/errors.py)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry

from qaserve.api.errors import ERROR_DOMAIN, INTERNAL_MESSAGE, MAX_TEXT_CHARS, error_status, is_abort
from qaserve.errors import (
    LISTED_MODELS,
    DeadlineTooShort,
    InferenceFailed,
    InvalidArgument,
    MalformedRequest,
    ModelFailed,
    ModelNotFound,
    ModelNotReady,
    ModelPinned,
    ModelTooLarge,
    Overloaded,
    QAServeError,
    ShuttingDown,
    Unauthenticated,
    first_line,
    redact_host_details,
    shorten,
)
from qaserve.metrics import Metrics


def unpacked(status: Any, kind: Any) -> Any:
    for packed in status.details:
        message = kind()
        if packed.Unpack(message):
            return message
    return None


def errors_counted(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("qaserve_errors_total", {"reason": reason}) or 0.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (InvalidArgument("top_k", "must be between 1 and 20"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (ModelNotFound("nope", ["a"]), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (ModelNotReady("loading"), grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY"),
        (ModelFailed("failed"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED"),
        (ModelPinned("pinned"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_PINNED"),
        (ModelTooLarge("too large"), grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_CACHE_FULL"),
        (Overloaded("busy", 0.25), grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
        (DeadlineTooShort("late"), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_TOO_SHORT"),
        (ShuttingDown("stopping"), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
        (InferenceFailed("forward failed"), grpc.StatusCode.INTERNAL, "INFERENCE_FAILED"),
        (MalformedRequest(), grpc.StatusCode.INTERNAL, "MALFORMED_REQUEST"),
        (Unauthenticated("no token", "MISSING_TOKEN"), grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN"),
    ],
)
def test_every_domain_error_maps_to_its_code_reason_and_message(
    metrics: Metrics, error: QAServeError, code: grpc.StatusCode, reason: str
) -> None:
    mapped = error_status(error, metrics, "Answer")

    assert (mapped.code, mapped.reason) == (code, reason)
    assert mapped.status.code == code.value[0]
    assert mapped.status.message == str(error)
    info = unpacked(mapped.status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (reason, ERROR_DOMAIN)
    assert errors_counted(metrics, reason) == 1


def test_invalid_argument_names_the_field_in_bad_request(metrics: Metrics) -> None:
    mapped = error_status(InvalidArgument("doc_stride", "must not be negative, got -1"), metrics, "Answer")

    bad = unpacked(mapped.status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [("doc_stride", "must not be negative, got -1")]
    assert unpacked(mapped.status, error_details_pb2.RetryInfo) is None


def test_overloaded_carries_its_retry_delay(metrics: Metrics) -> None:
    mapped = error_status(Overloaded("busy", 0.25), metrics, "Answer")

    retry = unpacked(mapped.status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 250_000_000
    assert unpacked(mapped.status, error_details_pb2.BadRequest) is None


def test_unexpected_errors_are_internal_generic_counted_and_logged_once_with_traceback(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    error = KeyError("secret internal detail")
    try:
        raise error
    except KeyError:
        with caplog.at_level(logging.ERROR, logger="qaserve.api.errors"):
            mapped = error_status(error, metrics, "AnswerMany item 'a'")

    assert (mapped.code, mapped.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert mapped.status.message == INTERNAL_MESSAGE
    assert "secret" not in str(mapped.status)
    assert unpacked(mapped.status, error_details_pb2.ErrorInfo).reason == "INTERNAL"
    assert errors_counted(metrics, "INTERNAL") == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage() == "AnswerMany item 'a' failed"
    assert errors[0].exc_info is not None and errors[0].exc_info[1] is error


def test_domain_errors_are_not_logged_as_errors(metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="qaserve.api.errors"):
        error_status(ModelNotReady("loading"), metrics, "Answer")
    assert all(r.levelno < logging.WARNING and r.exc_info is None for r in caplog.records)


def test_mapping_without_metrics_still_maps() -> None:
    assert error_status(ShuttingDown("stopping"), None, "Answer").code == grpc.StatusCode.UNAVAILABLE


def test_messages_and_descriptions_are_bounded_whatever_a_caller_builds(metrics: Metrics) -> None:
    mapped = error_status(InvalidArgument("question", "x" * 100_000), metrics, "Answer")

    assert len(mapped.status.message) == MAX_TEXT_CHARS
    bad = unpacked(mapped.status, error_details_pb2.BadRequest)
    assert len(bad.field_violations[0].description) == MAX_TEXT_CHARS
    assert mapped.status.ByteSize() < 4096


def test_aborts_are_recognised_by_type() -> None:
    assert is_abort(grpc.aio.AbortError())
    assert not is_abort(RuntimeError("AbortError"))

    class AbortError(Exception):  # the same name is not the same thing
        pass

    assert not is_abort(AbortError())


def test_model_not_found_shortens_the_name_and_lists_a_bounded_sorted_set_of_names() -> None:
    names = [f"model-{i:02d}" for i in range(LISTED_MODELS + 5)]
    error = ModelNotFound("x" * 10_000, reversed(names))

    message = str(error)
    assert message.startswith("model 'xxx") and "...'" in message
    assert message.endswith(", ".join(names[:LISTED_MODELS]) + " and 5 more")
    assert len(message) < 1000
    assert error.name == "x" * 10_000  # the full name stays available to the server


def test_model_not_found_without_configured_names() -> None:
    assert str(ModelNotFound("nope")) == "model 'nope' is not configured on this server"


def test_shorten_keeps_short_values_and_marks_cut_ones() -> None:
    assert shorten("tiny") == "tiny"
    assert shorten("a" * 100, 10) == "aaaaaaa..."
    assert len(shorten("a" * 100)) == 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[Errno 2] No such file or directory: '/srv/models/qa/config.json'",
            "[Errno 2] No such file or directory: '<model source>/config.json'",
        ),
        ("model directory /srv/models/qa does not exist", "model directory <model source> does not exist"),
        (
            "Can't load the configuration of 'acme/qa': /root/.cache/huggingface/hub/models--acme--qa/snapshots/1 "
            "is missing",
            "Can't load the configuration of 'acme/qa': <path> is missing",
        ),
        ("[Errno 13] Permission denied: '/home/ops/.cache/x.bin'", "[Errno 13] Permission denied: '<path>'"),
        ("cannot open ~/models/qa/tokenizer.json", "cannot open <path>"),
        (r"cannot open C:\Users\ops\models\qa", "cannot open <path>"),
        ("loaded from (/var/tmp/tmpab12cd/model.onnx)", "loaded from (<path>)"),
        ("see https://huggingface.co/docs for help", "see https://huggingface.co/docs for help"),
        ("Error while deserializing header: HeaderTooLarge", "Error while deserializing header: HeaderTooLarge"),
        ("a ratio of 1/2 in org/model", "a ratio of 1/2 in org/model"),
    ],
)
def test_load_failures_lose_every_host_path(text: str, expected: str) -> None:
    assert redact_host_details(text, ["/srv/models/qa"]) == expected


def test_a_library_error_is_quoted_by_its_first_line_or_its_type() -> None:
    """What a load or export failure message quotes of a framework's exception: one line, never an empty one."""
    assert first_line(RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH\n  at node 3\n  at node 4")) == (
        "[ONNXRuntimeError] : 10 : INVALID_GRAPH"
    )
    assert first_line(OSError()) == "OSError"
