"""The qaserve-client command line against the fake server."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

import qaserve_client
from qaserve_client.cli import main
from qaserve_client.options import OPTION_NAMES

from fake_qaserve import OVERLOAD_QUESTION, FakeServer, invalid_question_error

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

    assert status == 64 + 3  # INVALID_ARGUMENT
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: INVALID_ARGUMENT: question: must contain a non-whitespace character"
    assert err[1].strip() == "question: must contain a non-whitespace character"


def test_ask_unreachable_exits_78(unused_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--target", unused_target, "ask", "--question", "Q?", "--context", CONTEXT])

    assert status == 64 + 14  # UNAVAILABLE
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
    assert main(["--target", server.target, "health", "--service", "no.such.Service"]) == 64 + 5  # NOT_FOUND
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


def test_health_target_from_environment(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QASERVE_TARGET", server.target)

    assert main(["health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_health_unreachable_exits_78(unused_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", unused_target, "--timeout", "5", "health"]) == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: UNAVAILABLE: ")


SCRIPT = Path(sys.executable).parent / "qaserve-client"


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def test_installed_script(server: FakeServer) -> None:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed")

    completed = _run_script("--target", server.target, "ask", "--question", "Capital?", "--context", CONTEXT, "--json")

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["answers"][0]["answer"] == "Paris"


def test_ask_stream_json_prints_one_line_per_message(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", server.target, "ask", "--question", "Capital?", "--context", CONTEXT, "--stream", "--json"]

    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(line) for line in lines] == [["partial"], ["partial"], ["partial"], ["final"]]
    assert [line["partial"]["windows_done"] for line in lines[:3]] == [1, 2, 3]
    assert {line["partial"]["windows_total"] for line in lines[:3]} == {3}
    assert lines[0]["partial"]["answers"][0]["answer"] == "Paris"
    final = lines[3]["final"]
    assert final["answers"][0] == {
        "answer": "Paris",
        "score": 0.9,
        "start": 0,
        "end": 5,
        "byte_start": 0,
        "byte_end": 5,
    }
    assert (final["model"]["name"], final["windows"]) == ("fake", 3)


def test_ask_stream_human(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", server.target, "ask", "--question", "Capital?", "--context", CONTEXT, "--stream"]
    argv += ["--top-k", "2"]

    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"[{done}/3] best: Paris (0.9000)" for done in (1, 2, 3)]
    assert lines[3].split() == ["score", "span", "answer"]
    assert lines[4].split() == ["0.9000", "0-5", "Paris"]
    (request,) = server.servicer.requests
    assert request.top_k == 2


def test_ask_stream_error_exits_67(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--target", server.target, "ask", "--question", " ", "--context", CONTEXT, "--stream"])

    assert status == 67
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: INVALID_ARGUMENT: question: must contain a non-whitespace character"


def test_ask_stream_unreachable_exits_78(unused_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--target", unused_target, "ask", "--question", "Q?", "--context", CONTEXT, "--stream", "--json"])

    assert status == 78
    assert json.loads(capsys.readouterr().err)["error"]["code"] == "UNAVAILABLE"


def _write_jsonl(path: Path, *lines: object) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _results(out: str) -> dict[str, dict[str, object]]:
    results = {}
    for line in out.splitlines():
        data = json.loads(line)
        results[data["id"]] = data
    return results


def test_batch_prints_one_result_per_line(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_jsonl(
        tmp_path / "questions.jsonl",
        {"id": "capital", "question": "Capital?", "context": CONTEXT, "top_k": 2, "model": "tiny"},
        {"question": "Where?", "context": "Zürich liegt am See.", "align_to_words": False},
    )

    assert main(["--target", server.target, "batch", str(path)]) == 0
    results = _results(capsys.readouterr().out)
    assert set(results) == {"capital", "2"}
    assert results["capital"]["answers"] == [
        {"answer": "Paris", "score": 0.9, "start": 0, "end": 5, "byte_start": 0, "byte_end": 5},
        {"answer": "is", "score": 0.45, "start": 6, "end": 8, "byte_start": 6, "byte_end": 8},
    ]
    assert results["capital"]["model"] == {"name": "tiny", "revision": "sha256:00", "device": "cpu", "dtype": "float32"}
    assert set(results["2"]) == {"id", "answers", "model", "timing", "windows", "request_id"}
    sent = {request.question: request for request in server.servicer.requests}
    assert (sent["Capital?"].top_k, sent["Capital?"].HasField("align_to_words")) == (2, False)
    assert (sent["Where?"].HasField("top_k"), sent["Where?"].align_to_words) == (False, False)
    assert sent["Where?"].HasField("align_to_words")


def test_batch_item_error_exits_1_after_the_other_results(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_jsonl(
        tmp_path / "questions.jsonl",
        {"id": "good", "question": "Capital?", "context": CONTEXT},
        {"id": "bad", "question": "", "context": CONTEXT},
    )

    assert main(["--target", server.target, "batch", str(path)]) == 1
    captured = capsys.readouterr()
    results = _results(captured.out)
    assert results["good"]["answers"]
    assert results["bad"] == {
        "id": "bad",
        "error": invalid_question_error(results["good"]["request_id"]),
        "request_id": results["good"]["request_id"],
    }
    assert captured.err.splitlines()[-1].startswith("2 items: 1 ok, 1 failed (INVALID_ARGUMENT 1) in ")


def test_batch_reads_stdin_skips_blank_lines_and_numbers_ids(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        json.dumps({"question": "Capital?", "context": CONTEXT}),
        "",
        json.dumps({"question": "Q", "context": "x"}),
    ]
    lines.append(json.dumps({"id": 7, "question": "Q", "context": "y"}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))

    assert main(["--target", server.target, "batch", "-"]) == 0
    # A missing id is the line's number, an integer id its decimal string.
    assert set(_results(capsys.readouterr().out)) == {"1", "3", "7"}


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"question": "Q?"}', 'line 2: missing "context"'),
        ('{"question": "Q?", "context": "c", "top_k": "three"}', "line 2: Failed to parse top_k field"),
        ('{"question": "Q?", "context": "c", "top_k": true}', "line 2: Bool value True is not acceptable"),
        ('{"question": "Q?", "context": "c", "top_k": 1.5}', "line 2: Couldn't parse integer: 1.5"),
        ('{"question": "Q?", "context": "c", "align_to_words": 1}', "line 2: Expected true or false"),
        ('{"question": 5, "context": "c"}', "line 2: Failed to parse question field"),
        (
            '{"question": "Q?", "context": "c", "topk": 3}',
            'line 2: Message type "qaserve.v1.AnswerRequest" has no field named "topk"',
        ),
        ('{"id": true, "question": "Q?", "context": "c"}', 'line 2: "id" must be a string or an integer'),
        ('{"id": "a", "question": "Q?", "context": "c"}', "line 2: duplicate id 'a', first on line 1"),
    ],
)
def test_batch_malformed_line_exits_1_before_sending(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], second_line: str, message: str
) -> None:
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "Q?", "context": CONTEXT}) + "\n" + second_line + "\n")

    assert main(["--target", server.target, "batch", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path}: {message}")
    assert server.servicer.requests == []


def test_batch_missing_file_exits_1(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", server.target, "batch", str(tmp_path / "missing.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_batch_unreachable_exits_78(unused_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_jsonl(tmp_path / "questions.jsonl", {"question": "Q?", "context": CONTEXT})

    assert main(["--target", unused_target, "batch", str(path)]) == 78
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("1 items: 0 ok, 0 failed, 1 without a result in ")
    assert err[1].startswith("error: UNAVAILABLE: ")


def test_every_answer_option_has_a_flag(server: FakeServer) -> None:
    argv = ["--target", server.target, "ask", "--question", "Q?", "--context", CONTEXT, "--align-to-words"]

    assert main(argv) == 0
    (request,) = server.servicer.requests
    assert request.HasField("align_to_words") and request.align_to_words is True
    help_text = _help("ask")
    for name in OPTION_NAMES:
        assert f"--{name.replace('_', '-')}" in help_text


def _help(*command: str) -> str:
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(io.StringIO()) as out:
        main([*command, "--help"])
    assert exited.value.code == 0
    return out.getvalue()


def test_help_documents_the_exit_codes() -> None:
    text = _help()
    assert "64 + N" in text
    assert "69 NOT_FOUND" in text and "78 UNAVAILABLE" in text and "67 INVALID_ARGUMENT" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"qaserve-client {metadata.version('qaserve-client')}"
    assert qaserve_client.__version__ == metadata.version("qaserve-client")


def test_headers_reach_the_server_and_verbose_prints_the_request_id(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--target", server.target, "-H", "X-Tenant: acme", "--header", "x-request-id:req-cli", "-v"]
    argv += ["ask", "--question", "Capital?", "--context", CONTEXT]

    assert main(argv) == 0
    assert server.servicer.metadata[0]["x-tenant"] == "acme"
    assert server.servicer.metadata[0]["x-request-id"] == "req-cli"
    assert capsys.readouterr().err.strip() == "request id: req-cli"


def test_headers_go_with_every_call_of_a_batch_stream(server: FakeServer, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "questions.jsonl", {"question": "Q?", "context": CONTEXT})

    assert main(["--target", server.target, "-H", "x-tenant:acme", "batch", str(path)]) == 0
    assert [m["x-tenant"] for m in server.servicer.metadata] == ["acme"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("no-colon", "expected KEY:VALUE"),
        (":value", "expected KEY:VALUE"),
        ("bad key:1", "a header name holds only"),
        ("grpc-timeout:1", "reserved for gRPC"),
        ("x-trace-bin:AAAA", "binary (-bin) headers are not supported"),
        ("x-name:Zoë", "printable ASCII"),
    ],
)
def test_bad_header_is_a_usage_error(
    server: FakeServer, capsys: pytest.CaptureFixture[str], header: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--target", server.target, "-H", header, "health"])

    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert server.servicer.metadata == []


def test_json_error_on_stderr_with_request_id(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", server.target, "-H", "x-request-id:req-bad", "ask", "--question", " ", "--context", CONTEXT]

    assert main([*argv, "--json"]) == 67
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err) == {"error": invalid_question_error("req-bad")}


def test_json_before_the_command_applies_too(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", server.target, "--json", "ask", "--question", "Capital?", "--context", CONTEXT]) == 0
    assert json.loads(capsys.readouterr().out)["answers"][0]["answer"] == "Paris"
    assert main(["--target", server.target, "--json", "health"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "SERVING"}


def test_overload_exits_72_and_says_when_to_retry(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", server.target, "-v", "ask", "--question", OVERLOAD_QUESTION, "--context", CONTEXT]

    assert main(argv) == 64 + 8  # RESOURCE_EXHAUSTED
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: RESOURCE_EXHAUSTED: server is overloaded"
    assert err[1] == "  retry after 0.25 s"
    assert re.fullmatch(r"  request id: [0-9a-f]{32}", err[2])


def test_json_failure_that_is_not_an_rpc_error(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"

    assert main(["--target", server.target, "batch", str(missing), "--json"]) == 1
    error = json.loads(capsys.readouterr().err)["error"]
    assert error["message"].startswith(f"cannot read {missing}")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_batch_shows_progress_on_a_terminal_and_a_json_summary(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_jsonl(
        tmp_path / "questions.jsonl",
        {"id": "a", "question": "Q?", "context": CONTEXT},
        {"id": "b", "question": "", "context": CONTEXT},
        {"id": "c", "question": OVERLOAD_QUESTION, "context": CONTEXT},
        {"id": "d", "question": "", "context": CONTEXT},
    )
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    assert main(["--target", server.target, "-H", "x-request-id:req-batch", "batch", str(path), "--json"]) == 1
    err = terminal.getvalue()
    assert "\r4/4 answered, 3 failed" in err
    summary = json.loads(err.rsplit("\x1b[K", 1)[1])["summary"]
    assert summary["questions_per_second"] > 0
    del summary["questions_per_second"], summary["seconds"]
    assert summary == {
        "items": 4,
        "ok": 1,
        "failed": 3,
        "errors": {"INVALID_ARGUMENT": 2, "RESOURCE_EXHAUSTED": 1},
        "without_result": 0,
        "request_id": "req-batch",
    }
    assert {json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()} == {"req-batch"}


def test_batch_without_a_terminal_prints_no_progress(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_jsonl(tmp_path / "questions.jsonl", {"question": "Q?", "context": CONTEXT})

    assert main(["--target", server.target, "batch", str(path)]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"1 items: 1 ok, 0 failed in \d+\.\d\d s, \d+\.\d questions/s", line)


def test_batch_accepts_proto_json_spellings(server: FakeServer, tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "questions.jsonl",
        {"question": "Q?", "context": CONTEXT, "topK": 2, "maxSeqLen": "64", "doc_stride": None},
    )

    assert main(["--target", server.target, "batch", str(path)]) == 0
    (request,) = server.servicer.requests
    assert (request.top_k, request.max_seq_len, request.HasField("doc_stride")) == (2, 64, False)


def test_installed_script_exit_codes(server: FakeServer, unused_target: str) -> None:
    usage = _run_script("--target", server.target, "ask", "--question", "Q?")
    assert usage.returncode == 2
    assert "--context" in usage.stderr

    invalid = _run_script("--target", server.target, "ask", "--question", " ", "--context", CONTEXT)
    assert invalid.returncode == 67
    assert invalid.stderr.startswith("error: INVALID_ARGUMENT: ")

    unreachable = _run_script("--target", unused_target, "--timeout", "5", "--json", "health")
    assert unreachable.returncode == 78
    assert json.loads(unreachable.stderr)["error"]["code"] == "UNAVAILABLE"

    version = _run_script("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"qaserve-client {qaserve_client.__version__}")
