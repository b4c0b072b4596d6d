"""bench/threads.py: every case of the policy's measurements runs and reports a number, the global pool in a process
of its own."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench import threads


def test_every_case_is_measured_in_each_round(tiny_model_dir: Path, tiny_onnx_dir: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    shutil.copy(tiny_onnx_dir / "model.onnx", model)
    report = tmp_path / "threads.md"

    argv = ["--model", str(model), "--rounds", "2", "--seconds", "0.05", "--limit", "6", "--markdown", str(report)]
    assert threads.main(argv) == 0

    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in report.read_text().splitlines()]
    measured = {row[0]: row for row in rows if row and row[0].startswith(("onnx:", "torch:"))}
    assert len(measured) == 11, sorted(measured)
    assert any("global shared pool" in label for label in measured), "the global pool ran in its own process"
    for label, (_, median, rounds) in measured.items():
        assert float(median) > 0, label
        assert len(rounds.split(", ")) == 2, label  # one value per round
