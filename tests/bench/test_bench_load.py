"""make bench: its baseline is a plain script in a clean process, its ratios are right, and a run goes end to end."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest

from bench import load, rounds
from bench.evaldata import Question
from bench.load import Row
from qaserve_client import tls_credentials

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, make_pki, wait_serving

ROOT = Path(__file__).resolve().parents[2]
# What a user's own script would import: the frameworks, the tokenizer's library, numpy and the standard library.
BARE_MAY_IMPORT = {"__future__", "argparse", "collections", "json", "sys", "time", "typing"} | {
    "numpy", "onnxruntime", "torch", "transformers",
}  # fmt: skip


def test_bare_baseline_imports_no_qaserve_and_no_bench() -> None:
    imported = set()
    for node in ast.walk(ast.parse(load.BARE.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(str(node.module).split(".")[0])
    assert imported <= BARE_MAY_IMPORT, imported - BARE_MAY_IMPORT


def test_baselines_and_servers_start_without_thread_or_qaserve_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "QASERVE_PORT", "KMP_AFFINITY"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HOME_FOR_TEST", "kept")
    env = load.clean_env()
    assert not [k for k in env if k.startswith(("OMP_", "MKL_", "QASERVE_", "KMP_"))]
    assert env["HOME_FOR_TEST"] == "kept"


def row(label: str, backend: str, concurrency: int, qps: float, p50: float, round_: int, bare: bool = False) -> Row:
    return Row("m", label, backend, concurrency, qps, p50, p50 * 2, p50 * 3, Counter(), bare=bare, round=round_)


def two_rounds() -> list[Row]:
    """The host ran at half speed in round 2: the bare models and the server alike."""
    return [
        row("(a)", "torch", 1, 40.0, 22.0, 1, bare=True),
        row("(a')", "onnx", 1, 64.0, 14.0, 1, bare=True),
        row("onnx", "onnx", 1, 60.0, 15.0, 1),
        row("onnx", "onnx", 32, 80.0, 400.0, 1),
        row("torch", "torch", 32, 44.0, 700.0, 1),
        row("(a)", "torch", 1, 20.0, 44.0, 2, bare=True),
        row("(a')", "onnx", 1, 32.0, 28.0, 2, bare=True),
        row("onnx", "onnx", 1, 30.0, 30.0, 2),
        row("onnx", "onnx", 32, 40.0, 800.0, 2),
        row("torch", "torch", 32, 22.0, 1400.0, 2),
    ]


def test_rows_show_median_and_range_and_ratios_are_taken_within_each_round_against_both_bare_models() -> None:
    lines = rounds.table(two_rounds())[2:]
    cells = [[c.strip() for c in line.split("|")[2:-1]] for line in lines]
    assert [c[:5] for c in cells] == [
        ["(a)", "1", "30.0 (20.0 to 40.0)", "33.0 (22.0 to 44.0)", "99.0 (66.0 to 132.0)"],
        ["(a')", "1", "48.0 (32.0 to 64.0)", "21.0 (14.0 to 28.0)", "63.0 (42.0 to 84.0)"],
        ["onnx", "1", "45.0 (30.0 to 60.0)", "22.5 (15.0 to 30.0)", "67.5 (45.0 to 90.0)"],
        ["onnx", "32", "60.0 (40.0 to 80.0)", "600.0 (400.0 to 800.0)", "1800.0 (1200.0 to 2400.0)"],
        ["torch", "32", "33.0 (22.0 to 44.0)", "1050.0 (700.0 to 1400.0)", "3150.0 (2100.0 to 4200.0)"],
    ]
    # Each round's ratio: the drift cancels (1.25x in both rounds), where ratios of medians would not separate it.
    assert [c[6:] for c in cells] == [
        ["1.00x (1.00 to 1.00)", "+0.0 (+0.0 to +0.0)", "0.62x (0.62 to 0.62)", "+12.0 (+8.0 to +16.0)"],
        ["1.60x (1.60 to 1.60)", "-12.0 (-16.0 to -8.0)", "1.00x (1.00 to 1.00)", "+0.0 (+0.0 to +0.0)"],
        ["1.50x (1.50 to 1.50)", "-10.5 (-14.0 to -7.0)", "0.94x (0.94 to 0.94)", "+1.5 (+1.0 to +2.0)"],
        ["2.00x (2.00 to 2.00)", "", "1.25x (1.25 to 1.25)", ""],  # p50 differences only at concurrency 1
        ["1.10x (1.10 to 1.10)", "", "0.69x (0.69 to 0.69)", ""],
    ]
    assert rounds.targets(two_rounds()) == [
        "- m, onnx @ 1: p50 at most +1.5 ms over (a'): +1.5 ms (+1.0 to +2.0): met",
        "- m, onnx @ 32: at least 1x (a')'s q/s: 1.25x (1.25 to 1.25): met",
        "- m, torch @ 32: at least 1.2x (a)'s q/s: 1.10x (1.10 to 1.10): NOT met",
    ]


def test_a_row_without_a_bare_model_in_its_round_gets_no_ratio() -> None:
    rows = [row("(a)", "torch", 1, 40.0, 22.0, 1, bare=True), row("onnx", "onnx", 1, 60.0, 15.0, 2)]
    (_, served) = rounds.table(rows)[2:]
    assert [c.strip() for c in served.split("|")[8:12]] == ["", "", "", ""]


def test_errors_are_printed_by_code() -> None:
    failing = row("torch", "torch", 8, 1.0, 1.0, 1)
    failing.errors.update({"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1})
    again = row("torch", "torch", 8, 1.0, 1.0, 2)
    again.errors.update({"UNAVAILABLE": 1})
    (line,) = rounds.table([failing, again])[2:]
    assert "| DEADLINE_EXCEEDED 1, UNAVAILABLE 3 |" in line


def test_long_contexts_join_the_paragraphs_that_follow_a_questions_own() -> None:
    questions = [Question(str(i), f"q{i}", f"paragraph {i // 2}", ()) for i in range(6)]  # two questions each
    assert load.select_workload(questions, 2, None, paragraphs=2) == [
        ("q0", "paragraph 0\n\nparagraph 1"),
        ("q2", "paragraph 1\n\nparagraph 2"),
        ("q4", "paragraph 2"),  # the last paragraph has none after it
    ]
    assert load.select_workload(questions, 1, 2) == [("q0", "paragraph 0"), ("q1", "paragraph 0")]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Two SQuAD questions: one on a short context, one on a long context that gives several windows."""
    answers = [{"text": "Paris", "answer_start": 54}]
    qas = [{"id": str(i), "question": SEED_QUESTION, "answers": answers} for i in (0, 1)]
    long_context = SEED_CONTEXT + " Paris." * 400
    paragraphs = [{"context": SEED_CONTEXT, "qas": qas[:1]}, {"context": long_context, "qas": qas[1:]}]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def test_bench_runs_the_bare_baseline_and_the_default_server_end_to_end(
    tiny_model_dir: Path, tmp_path: Path, data: Path
) -> None:
    """A short run on a tiny model in two rounds: the bare torch baseline and the default server's row, each with
    its range over the rounds; the report names the machine, the command, protobuf's backend and zero errors; the
    plot is written."""
    report, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--models", str(tiny_model_dir), "--data", str(data), "--stride", "1", "--seconds", "0.3"]
    argv += ["--warmup", "0", "--backends", "", "--concurrency", "2", "--markdown", str(report), "--rounds", "2"]

    assert load.main([*argv, "--plot", str(plot)]) == 0

    text = report.read_text()
    assert "2 questions of squad.json (1 in 1" in text and "2 interleaved round(s)" in text
    assert "CPU cores" in text and "- command: `" in text and "--stride 1" in text
    assert "(upb backend)" in text  # protobuf's C parser, not the pure-Python one
    assert "no model.onnx, so no (a')" in text
    lines = [line for line in text.splitlines() if line.startswith(f"| {tiny_model_dir.name} |")]
    labels = [line.split("|")[2].strip() for line in lines]
    assert labels == ["(a) bare torch fp32", "qaserve default (backend auto, cache on)"]
    assert all(" to " in line.split("|")[4] for line in lines)  # q/s: median (lowest to highest) over the rounds
    assert lines[1].split("|")[7].strip() == "0"  # errors
    assert plot.read_bytes().startswith(b"\x89PNG")
    windows = next(line for line in text.splitlines() if "windows for 2 questions" in line)
    assert int(windows.split(": ")[1].split()[0]) > 2
    assert "- errors: 0" in text


async def _serving_over_tls(target: str, process: subprocess.Popen[str], ca: Path) -> None:
    async with grpc.aio.secure_channel(target, tls_credentials(ca)) as channel:
        await wait_serving(channel, process, 120)


def test_bench_drives_a_server_started_elsewhere_open_loop_over_tls_with_a_token(
    tiny_model_dir: Path, tmp_path: Path, data: Path
) -> None:
    """--target: no local servers, no baselines; open loop at each --rate over several channels, TLS checked against
    a CA file, a bearer token from a file, the table and the plot written; a wrong token shows as UNAUTHENTICATED
    errors and exit status 1."""
    pki = make_pki(tmp_path)
    (tmp_path / "tokens").write_text("s3cret\n")
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "wrong").write_text("guess\n")
    qaserve = str(Path(sys.executable).with_name("qaserve"))
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    server = load.ServerProcess(
        qaserve, tiny_model_dir, "tiny", "auto", True, [*tls, "--auth-tokens-file", str(tmp_path / "tokens")]
    )
    try:
        asyncio.run(_serving_over_tls(server.target, server.proc, pki.ca))
        argv = ["--target", server.target, "--rate", "4,8", "--seconds", "1", "--warmup", "0.2", "--channels", "2"]
        argv += ["--ca-file", str(pki.ca), "--data", str(data), "--stride", "1", "--plot", str(tmp_path / "load.png")]
        # As a user runs it: its own process, from the repository, nothing but the repository on the path.
        command = [sys.executable, "-m", "bench.load", *argv, "--token-file", str(tmp_path / "token")]
        done = subprocess.run([*command, "--markdown", str(tmp_path / "ok.md")], cwd=ROOT, env=load.clean_env(),
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert load.main([*argv, "--token-file", str(tmp_path / "wrong"), "--markdown", str(tmp_path / "no.md")]) == 1
    finally:
        server.stop()

    text = (tmp_path / "ok.md").read_text()
    assert f"against {server.target}" in text and "2 gRPC channels, TLS, bearer token" in text
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if "| open loop" in line]
    assert [row[2] for row in rows] == ["4", "8"]  # offered q/s
    assert all(float(row[4]) > 0 and row[8] == "0" for row in rows)  # answered q/s, errors
    assert "- kept up with " in text
    assert (tmp_path / "load.png").read_bytes().startswith(b"\x89PNG")
    assert "UNAUTHENTICATED" in (tmp_path / "no.md").read_text()


def test_the_other_doors_and_the_streams_are_measured_on_the_same_server_and_compared_with_its_grpc_rows(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """HTTP JSON, V2 gRPC, AnswerMany (32 questions in flight on one stream) and AnswerProgressive each answer
    without errors on the cache-off server, and each is compared with the Answer row of its concurrency."""
    qas = [{"id": "0", "question": SEED_QUESTION, "answers": [{"text": "Paris", "answer_start": 54}]}]
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": SEED_CONTEXT, "qas": qas}]}]}))
    report = tmp_path / "bench.md"
    argv = ["--models", str(tiny_model_dir), "--data", str(data), "--seconds", "0.3", "--warmup", "0", "--stride", "1"]
    argv += ["--backends", "torch", "--concurrency", "1,32", "--no-cache-row", "--rounds", "1"]
    argv += ["--markdown", str(report)]

    assert load.main(argv) == 0

    text = report.read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith(f"| {tiny_model_dir.name} | qaserve")]
    doors = [(cells[2].strip().rpartition(", ")[2], int(cells[3])) for cells in rows]
    assert doors == [
        ("cache off", 1), ("cache off", 32), ("HTTP JSON", 1), ("HTTP JSON", 32), ("V2 gRPC", 1),
        ("gRPC AnswerMany", 32), ("gRPC AnswerProgressive", 1),
    ]  # fmt: skip
    assert all(float(cells[4]) > 0 and cells[7].strip() == "0" for cells in rows)  # answers counted, no errors
    compared = [line for line in text.splitlines() if line.startswith(f"- {tiny_model_dir.name}, --backend torch, ")]
    assert [line.split(", ", 2)[2].split(":")[0] for line in compared] == [
        "HTTP JSON @ 1", "HTTP JSON @ 32", "V2 gRPC @ 1", "gRPC AnswerMany @ 32", "gRPC AnswerProgressive @ 1",
    ]  # fmt: skip
    assert compared[3].endswith("x gRPC Answer's q/s") and ": p50 " in compared[4] and "vs gRPC Answer" in compared[4]
    targeted = [line.split(": ")[0] for line in text.splitlines() if line.endswith("met")]
    assert targeted == [f"- {tiny_model_dir.name}, qaserve --backend torch, cache off @ {c}" for c in (1, 32)]
    assert "- errors: 0" in text
