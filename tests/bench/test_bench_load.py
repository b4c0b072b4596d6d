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

from bench import load
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


def row(label: str, backend: str, concurrency: int, qps: float, p50: float, bare: bool = False) -> Row:
    return Row("m", label, backend, concurrency, qps, p50, p50 * 2, p50 * 3, Counter(), bare=bare)


def test_ratios_against_bare_torch_everywhere_and_bare_onnx_on_onnx_rows() -> None:
    a = row("(a)", "torch", 1, 40.0, 22.0, bare=True)
    a_onnx = row("(a')", "onnx", 1, 64.0, 14.0, bare=True)
    rows = [
        a,
        a_onnx,
        row("torch", "torch", 1, 38.0, 24.5),
        row("torch", "torch", 32, 44.0, 700.0),
        row("onnx", "onnx", 1, 60.0, 15.0),
        row("onnx", "onnx", 32, 80.0, 400.0),
    ]
    baselines = {("m", "torch"): a, ("m", "onnx"): a_onnx}
    cells = [[c.strip() for c in line.split("|")[9:13]] for line in load.table(rows, baselines)[2:]]
    assert cells == [
        ["1.00x", "+0.0", "", ""],
        ["1.60x", "-8.0", "1.00x", "+0.0"],
        ["0.95x", "+2.5", "", ""],  # p50 differences only at concurrency 1
        ["1.10x", "", "", ""],
        ["1.50x", "-7.0", "0.94x", "+1.0"],
        ["2.00x", "", "1.25x", ""],
    ]
    assert load.summary(rows, baselines) == [
        "- m, qaserve --backend torch, cache off: concurrency 1 p50 +2.5 ms vs (a); concurrency 32 1.10x (a)'s q/s",
        "- m, qaserve --backend onnx, cache off: concurrency 1 p50 -7.0 ms vs (a); concurrency 32 2.00x (a)'s q/s; "
        "1.25x (a')'s",
    ]


def test_errors_are_printed_by_code() -> None:
    failing = row("torch", "torch", 8, 1.0, 1.0)
    failing.errors.update({"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1})
    (line,) = load.table([failing], {})[2:]
    assert "| DEADLINE_EXCEEDED 1, UNAVAILABLE 2 |" in line


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
    """A short run on a tiny model: the bare torch baseline and the default server's row; the report names the
    machine, the command and zero errors."""
    report = tmp_path / "bench.md"
    argv = ["--models", str(tiny_model_dir), "--data", str(data), "--stride", "1", "--seconds", "0.3"]
    argv += ["--warmup", "0", "--backends", "", "--concurrency", "2", "--markdown", str(report)]

    assert load.main(argv) == 0

    text = report.read_text()
    assert "2 questions of squad.json (1 in 1" in text
    assert "CPU cores" in text and "- command: `" in text and "--stride 1" in text
    assert "no model.onnx, so no (a')" in text
    lines = [line for line in text.splitlines() if line.startswith(f"| {tiny_model_dir.name} |")]
    labels = [line.split("|")[2].strip() for line in lines]
    assert labels == ["(a) bare torch fp32", "qaserve default (backend auto, cache on)"]
    assert lines[1].split("|")[8].strip() == "0"  # errors
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


def test_the_other_doors_are_measured_on_the_same_server_and_compared_with_its_grpc_rows(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    qas = [{"id": "0", "question": SEED_QUESTION, "answers": [{"text": "Paris", "answer_start": 54}]}]
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": SEED_CONTEXT, "qas": qas}]}]}))
    report = tmp_path / "bench.md"
    argv = ["--models", str(tiny_model_dir), "--data", str(data), "--seconds", "0.3", "--warmup", "0", "--stride", "1"]
    argv += ["--backends", "torch", "--concurrency", "1,32", "--no-cache-row", "--markdown", str(report)]

    assert load.main(argv) == 0

    text = report.read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith(f"| {tiny_model_dir.name} | qaserve")]
    doors = [(cells[2].strip().rpartition(", ")[2], int(cells[3])) for cells in rows]
    assert doors == [("cache off", 1), ("cache off", 32), ("HTTP JSON", 1), ("HTTP JSON", 32), ("V2 gRPC", 1)]
    assert all(cells[8].strip() == "0" for cells in rows)  # errors
    assert "HTTP JSON @ 1: p50" in text and "HTTP JSON @ 32: " in text and "V2 gRPC @ 1: p50" in text
    assert "- errors: 0" in text
