"""The qaserve-client command line against the fake server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from qaserve_client.cli import main

from fake_qaserve import FakeServer

CONTEXT = "Paris is the capital of France."


def test_ask_json(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--target", server.target, "ask", "--question", "Capital?", "--context", CONTEXT, "--json"])

    assert status == 0
    data = json.loads(capsys.readouterr().out)
    best = data["answers"][0]
    assert (best["answer"], best["start"], best["end"]) == ("Paris", 0, 5)
    assert 0 <= best["score"] <= 1
    assert data["model"]["name"] == "fake"
    assert data["windows"] == 1


def test_ask_passes_options(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", server.target, "ask", "--question", "Capital?", "--context", CONTEXT, "--top-k", "2"]
    argv += ["--model", "tiny", "--max-answer-len", "5", "--max-seq-len", "64", "--doc-stride", "16"]
    argv += ["--max-question-len", "8", "--handle-impossible-answer", "--no-align-to-words"]

    assert main(argv) == 0
    (request,) = server.servicer.requests
    assert (request.top_k, request.model, request.max_answer_len, request.max_seq_len) == (2, "tiny", 5, 64)
    assert (request.doc_stride, request.max_question_len) == (16, 8)
    assert request.handle_impossible_answer is True
    assert request.HasField("align_to_words")
    assert request.align_to_words is False


def test_ask_leaves_unset_options_unset(server: FakeServer) -> None:
    assert main(["--target", server.target, "ask", "--question", "Capital?", "--context", CONTEXT]) == 0
    (request,) = server.servicer.requests
    assert not request.HasField("top_k")
    assert not request.HasField("align_to_words")


def test_ask_table(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--target", server.target, "ask", "--question", "Capital?", "--context", CONTEXT, "--top-k", "2"])

    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["score", "span", "answer"]
    assert lines[1].split() == ["0.9000", "0-5", "Paris"]
    assert lines[2].split() == ["0.4500", "6-8", "is"]


def test_ask_reads_context_file(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "context.txt"
    path.write_text("Grüße aus Köln.", encoding="utf-8")

    status = main(["--target", server.target, "ask", "--question", "Wer?", "--context-file", str(path), "--json"])

    assert status == 0
    assert server.servicer.requests[0].context == "Grüße aus Köln."
    best = json.loads(capsys.readouterr().out)["answers"][0]
    assert (best["answer"], best["byte_start"], best["byte_end"]) == ("Grüße", 0, 7)


def test_ask_reads_context_from_stdin(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Stdin text here."))

    status = main(["--target", server.target, "ask", "--question", "What?", "--context-file", "-", "--json"])

    assert status == 0
    assert json.loads(capsys.readouterr().out)["answers"][0]["answer"] == "Stdin"


def test_ask_missing_context_file(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.txt"

    status = main(["--target", server.target, "ask", "--question", "Q?", "--context-file", str(missing)])

    assert status == 1
    assert "cannot read context" in capsys.readouterr().err
    assert server.servicer.requests == []


def test_ask_error_prints_code_and_field_violations(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--target", server.target, "ask", "--question", "", "--context", CONTEXT])

    assert status == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: INVALID_ARGUMENT: question: must contain a non-whitespace character"
    assert err[1].strip() == "question: must contain a non-whitespace character"


def test_ask_unreachable_exits_2(unused_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--target", unused_target, "ask", "--question", "Q?", "--context", CONTEXT])

    assert status == 2
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_health_serving(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_health_not_serving(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.set_health("", health_pb2.HealthCheckResponse.NOT_SERVING)

    assert main(["--target", server.target, "health"]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"


def test_health_of_one_service(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.set_health("qaserve.v1.QuestionAnsweringService", health_pb2.HealthCheckResponse.SERVING)

    assert main(["--target", server.target, "health", "--service", "qaserve.v1.QuestionAnsweringService"]) == 0
    assert main(["--target", server.target, "health", "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


def test_health_target_from_environment(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QASERVE_TARGET", server.target)

    assert main(["health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_health_unreachable_exits_2(unused_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", unused_target, "--timeout", "5", "health"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: UNAVAILABLE: ")


def test_installed_script(server: FakeServer) -> None:
    script = Path(sys.executable).parent / "qaserve-client"
    if not script.exists():
        pytest.skip(f"{script} is not installed")

    completed = subprocess.run(
        [
            str(script),
            "--target",
            server.target,
            "ask",
            "--question",
            "Capital?",
            "--context",
            CONTEXT,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["answers"][0]["answer"] == "Paris"
