"""Logs fit for aggregation: JSON lines, one DEBUG line per request with its id, and the id back to the client."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator

import grpc
import pytest

from qaserve.logs import JsonFormatter, configure_logging, request_id
from qaserve.server import QAServer
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION


@pytest.fixture(scope="module")
async def stub(tiny_server: tuple[QAServer, str]) -> AsyncIterator[pb_grpc.QuestionAnsweringServiceStub]:
    async with grpc.aio.insecure_channel(tiny_server[1]) as channel:
        yield pb_grpc.QuestionAnsweringServiceStub(channel)


def request_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "qaserve.api.scope" and hasattr(r, "rpc")]


async def test_each_request_logs_one_debug_line_with_its_id_model_code_and_timings(
    stub: pb_grpc.QuestionAnsweringServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qaserve.api.scope")
    # A context no other test sends: the answer must come from the model, not the response cache.
    call = stub.Answer(
        pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT + " It has a log."),
        metadata=(("x-request-id", "req-42"),),
        timeout=10,
    )
    await call
    assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())
    [line] = request_lines(caplog)
    fields = vars(line)
    assert (fields["request_id"], fields["rpc"], fields["model"], fields["code"]) == ("req-42", "Answer", "tiny", "OK")
    assert fields["duration_ms"] > 0 and fields["forward_ms"] > 0 and "queue_ms" in fields
    assert line.levelno == logging.DEBUG
    assert "request_id=req-42" in line.getMessage()


async def test_a_failed_request_gets_a_new_id_next_to_its_error_details(
    stub: pb_grpc.QuestionAnsweringServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="qaserve.api.scope")
    # An id with a space is not taken as it is: the server makes its own.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Answer(pb.AnswerRequest(question=" ", context=SEED_CONTEXT), metadata=(("x-request-id", "a b"),))
    trailing = dict(caught.value.trailing_metadata() or ())
    assert "grpc-status-details-bin" in trailing
    assert re.fullmatch(r"[0-9a-f]{32}", trailing["x-request-id"])
    [line] = request_lines(caplog)
    assert (vars(line)["request_id"], vars(line)["code"]) == (trailing["x-request-id"], "INVALID_ARGUMENT")


def test_json_lines_carry_the_fields_request_id_and_traceback() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("qaserve.test_logs")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", "json", stream)
        token = request_id.set("abc")
        try:
            logger.info("answered %s", "Answer", extra={"model": "tiny", "duration_ms": 1.5})
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("failed")
        finally:
            request_id.reset(token)
        logger.debug("not at INFO")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "answered Answer" and first["level"] == "INFO"
    assert (first["model"], first["duration_ms"], first["request_id"]) == ("tiny", 1.5, "abc")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert "RuntimeError: boom" in second["exception"]


def test_json_formatter_leaves_out_an_absent_request_id() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain", None, None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry == {"time": entry["time"], "level": "WARNING", "logger": "x", "message": "plain"}
