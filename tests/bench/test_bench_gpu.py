"""bench/gpu.py: its dry run takes every step on the CPU (no GPU needed to check it); without a GPU it says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bench import gpu


def test_dry_run_measures_bare_torch_bare_onnx_and_the_server_at_each_size(
    tiny_model_dir: Path, tiny_onnx_dir: Path, tmp_path: Path
) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    for name in ("model.onnx", "qaserve-onnx.json"):
        shutil.copy(tiny_onnx_dir / name, model)
    report = tmp_path / "gpu.md"

    assert gpu.main(["--dry-run", "--model", str(model), "--markdown", str(report)]) == 0

    text = report.read_text()
    assert "--dry-run" in text and "bench.gpu" in text
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    measured = [(row[0], int(row[1])) for row in rows[1:]]  # after the header
    assert measured == [
        ("bare torch float32", 1),
        ("bare torch float32", 2),
        ("bare ONNX Runtime, CPUExecutionProvider", 1),
        ("bare ONNX Runtime, CPUExecutionProvider", 2),
        ("qaserve --backend torch --dtype float32", 1),
        ("qaserve --backend torch --dtype float32", 2),
    ]
    assert all(float(row[2]) > 0 for row in rows[1:])  # windows/s or answers/s


def test_without_a_gpu_it_stops_at_once_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full run would start")
    assert gpu.main(["--device", "cuda:0"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_unknown_dtypes_are_refused() -> None:
    with pytest.raises(SystemExit):
        gpu.parse_args(["--dtypes", "float8"])
