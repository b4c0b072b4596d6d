"""The CI release check (part of `make test`): `make release` builds both wheels, of one version and with their
index metadata, and both image contexts; the client wheel, installed alone into a fresh virtual environment, brings
no torch and answers the seed question from a real `qaserve serve` process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make release` into a directory of its own."""
    out = tmp_path_factory.mktemp("dist")
    built = _run("make", "release", f"DIST={out}", cwd=ROOT)
    assert built.returncode == 0, built.stdout + built.stderr
    return out


@pytest.fixture(scope="module")
def wheels(release: Path) -> dict[str, Path]:
    found = {path.name.split("-")[0]: path for path in release.glob("*.whl")}
    assert set(found) == {"qaserve_client", "qaserve"}, found
    return found


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`qaserve serve` on a free loopback port, serving the embedded model."""
    process = subprocess.Popen(
        [BIN / "qaserve", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "QASERVE_LOG_FORMAT": "text"},
    )
    assert process.stderr is not None
    target = None
    for line in process.stderr:
        if match := re.search(r"gRPC on (\S+):(\d+) ", line):
            target = f"{match.group(1)}:{match.group(2)}"
            break
    assert target is not None, "qaserve serve exited before it listened"
    try:
        yield target, process
    finally:
        process.terminate()
        process.communicate(timeout=60)


def test_both_wheels_carry_the_licence(wheels: dict[str, Path]) -> None:
    for wheel in wheels.values():
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            assert "License-Expression: Apache-2.0" in archive.read(metadata).decode()
            licence = next(n for n in archive.namelist() if n.endswith("/licenses/LICENSE"))
            assert archive.read(licence) == (ROOT / "LICENSE").read_bytes()


def test_both_wheels_have_the_version_of_the_version_file_and_read_well_on_an_index(wheels: dict[str, Path]) -> None:
    version = (ROOT / "VERSION").read_text().strip()
    assert {wheel.name.split("-")[1] for wheel in wheels.values()} == {version}
    for name, wheel in wheels.items():
        with zipfile.ZipFile(wheel) as archive:
            metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert "Description-Content-Type: text/markdown" in metadata, name
        assert f"# {name.replace('_', '-')}" in metadata  # the distribution's README is its description
        assert "Classifier: Programming Language :: Python :: 3.11" in metadata
        assert "Project-URL: Source, https://github.com/qaserve/qaserve" in metadata


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_each_image_context_builds_its_device_from_the_wheels_and_the_lock(release: Path, device: str) -> None:
    version = (ROOT / "VERSION").read_text().strip()
    revision = _run("git", "rev-parse", "HEAD", cwd=ROOT).stdout.strip()
    with tarfile.open(release / f"qaserve-{version}-image-{device}.tar.gz") as context:
        names = {name.removeprefix("./") for name in context.getnames()}
        dockerfile = context.extractfile("./Dockerfile").read().decode()  # type: ignore[union-attr]
        lock = context.extractfile("./constraints.txt").read()  # type: ignore[union-attr]
    assert f"\nARG DEVICE={device}\n" in dockerfile and f"\nARG VERSION={version}\n" in dockerfile
    assert f"\nARG REVISION={revision}\n" in dockerfile
    assert lock == (ROOT / "constraints.txt").read_bytes()
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE):
        assert source.rstrip("/") in names, source
    for wheel in re.findall(r'"(wheels/\S+?\.whl)', dockerfile):
        assert wheel.replace("${VERSION}", version) in names, wheel
    assert "models/minilm-l6-squadshifts/model.onnx" in names


def test_client_wheel_alone_answers_without_torch(
    wheels: dict[str, Path], server: tuple[str, subprocess.Popen[str]], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = _run(venv / "bin" / "pip", "install", "--quiet", "-c", ROOT / "constraints.txt",
                     wheels["qaserve_client"])  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    for module in ("torch", "qaserve", "transformers"):
        probe = _run(venv / "bin" / "python", "-c", f"import {module}")
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module

    client = venv / "bin" / "qaserve-client"
    server_target, process = server
    # The server reports SERVING once its model is loaded; health exits 0 only then.
    while _run(client, "--target", server_target, "--timeout", "5", "health").returncode != 0:
        assert process.poll() is None, "qaserve serve exited while loading its model"
        time.sleep(0.5)
    asked = _run(
        client, "--target", server_target, "ask", "--question", SEED_QUESTION, "--context", SEED_CONTEXT, "--json"
    )
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)["answers"][0]
    assert answer["answer"] == "Paris"
    assert SEED_CONTEXT[answer["start"] : answer["end"]] == "Paris"


def _requires(wheel: Path) -> dict[str, set[str]]:
    """The wheel's dependencies by extra ("" for the base install): distribution names only."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    found: dict[str, set[str]] = {}
    for line in lines:
        if line.startswith("Requires-Dist: "):
            requirement = Requirement(line.removeprefix("Requires-Dist: "))
            extra = re.search(r'extra == "([^"]+)"', str(requirement.marker or ""))
            found.setdefault(extra.group(1) if extra else "", set()).add(requirement.name)
    return found


def test_onnx_runtime_builds_are_alternative_extras_and_torch_is_optional(wheels: dict[str, Path]) -> None:
    requires = _requires(wheels["qaserve"])
    assert not requires[""] & {"torch", "onnxruntime", "onnxruntime-gpu"}
    assert "onnxruntime" in requires["cpu"] and "onnxruntime-gpu" not in requires["cpu"]
    assert "onnxruntime-gpu" in requires["cuda"] and "onnxruntime" not in requires["cuda"]
    assert "torch" in requires["torch"] and not requires["torch"] & {"onnxruntime", "onnxruntime-gpu"}
