"""The `qaserve` command's answers to bad configuration: exit 2 and one line naming the culprit, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import qaserve
from qaserve.main import main

QASERVE = str(Path(sys.executable).parent / "qaserve")
TOKEN = "tok-3f9a1c77e2"


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    models_file: str = ""  # written to a file that --models-config names


PINNED_NO = '[[models]]\nname = "minilm"\nsource = "."\npinned = "no"\n'
UNKNOWN_KEY = '[[models]]\nname = "minilm"\nsource = "."\ntrust_remote_code = true\n'
# Loads nothing: its source is missing, so the preloaded model fails after the settings were logged.
MISSING_MODEL = '[[models]]\nname = "gone"\nsource = "./no-such-model"\npreload = true\nwarmup = false\n'

# Run as processes, all at once: each start costs seconds of imports on a small machine. The other cases call
# main() in this process, which parses and exits the same way.
CASES = {
    "port-env": Case(("serve",), (("QASERVE_PORT", "abc"),)),
    "pinned-no": Case(("serve",), models_file=PINNED_NO),
    "help-bad-env": Case(("serve", "--help"), (("QASERVE_PORT", "abc"),)),
    "version": Case(("--version",)),
    "port-in-use": Case(("serve", "--host", "127.0.0.1", "--metrics-port", "0", "--device", "cpu")),
    "preload-fails": Case(
        ("serve", "--log-format", "json", "--log-level", "debug", "--metrics-port", "0", "--port", "0"),
        (("QASERVE_AUTH_TOKENS", TOKEN),),
        models_file=MISSING_MODEL,
    ),
}


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Ran]]:
    """Every case run at once through the installed `qaserve` command (each start costs seconds of imports)."""
    workdir = tmp_path_factory.mktemp("cli")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("QASERVE_")}
    base_env["QASERVE_HTTP_PORT"] = "0"  # no fixed port: tests run side by side
    processes = {}
    for name, case in CASES.items():
        argv = list(case.argv)
        if name == "port-in-use":
            argv += ["--port", str(busy.getsockname()[1])]
        if case.models_file:
            path = workdir / f"{name}.toml"
            path.write_text(case.models_file)
            argv += ["--models-config", str(path)]
        processes[name] = subprocess.Popen(
            [QASERVE, *argv],
            env={**base_env, **dict(case.env)},
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=240)
            results[name] = Ran(process.returncode, stdout, stderr)
        yield results
    finally:
        busy.close()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def test_bad_environment_and_models_file_exit_2_with_one_line(ran: dict[str, Ran]) -> None:
    for case, names in (
        ("port-env", ("QASERVE_PORT", "'abc'", "an integer from 0 to 65535")),
        ("pinned-no", ("model 'minilm'", "pinned", "'no'", "true or false")),
    ):
        result = ran[case]
        assert result.code == 2, result
        [line] = result.stderr_lines
        assert line.startswith("qaserve serve: error: "), line
        assert all(name in line for name in names), line
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("argv", "env", "models_file", "names"),
    [
        (["--log-level", "verbose"], {}, "", ("--log-level", "'verbose'", "DEBUG, INFO, WARNING, ERROR, CRITICAL")),
        (["--device", "gpu"], {}, "", ("--device", "'gpu'", "auto, cpu, cuda, cuda:N, mps")),
        (["--dtype", "fp16"], {}, "", ("--dtype", "'fp16'", "auto, float32, float16, bfloat16, int8")),
        (["--max-batch-windows", "0"], {}, "", ("--max-batch-windows", "'0'", "an integer >= 1")),
        ([], {"QASERVE_LOG_FORMAT": "xml"}, "", ("QASERVE_LOG_FORMAT", "'xml'", "text, json")),
        ([], {"QASERVE_KEEPALIVE_TIME_SECONDS": "soon"}, "", ("QASERVE_KEEPALIVE_TIME_SECONDS", "a number > 0")),
        # A flag wins over the environment: the bad QASERVE_PORT is never read, --backend is what fails.
        (["--port", "1", "--backend", "tensorrt"], {"QASERVE_PORT": "abc"}, "", ("--backend", "auto, torch, onnx")),
        ([], {}, UNKNOWN_KEY, ("model 'minilm'", "unknown key 'trust_remote_code'", "replicas_per_device")),
        ([], {}, '[[models]]\nname = "m"\nsource = "."\npreload = "false"\n', ("model 'm'", "preload", "'false'")),
        ([], {}, '[[models]]\nname = "m"\nsource = "."\nreplicas_per_device = -1\n', ("replicas_per_device", ">= 0")),
        (["--auth-tokens", TOKEN], {}, "", ("--auth-tokens is not a flag", "QASERVE_AUTH_TOKENS")),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    models_file: str,
    names: tuple[str, ...],
) -> None:
    for name in [k for k in os.environ if k.startswith("QASERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if models_file:
        (tmp_path / "models.toml").write_text(models_file)
        argv = [*argv, "--models-config", str(tmp_path / "models.toml")]
    try:
        code = main(["serve", *argv])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    assert line.startswith("qaserve serve: error: ") and out == ""
    assert all(name in line for name in names), line
    assert TOKEN not in line


def test_help_works_whatever_the_environment(ran: dict[str, Ran]) -> None:
    result = ran["help-bad-env"]
    assert result.code == 0, result
    assert "--max-in-flight N" in result.stdout and "[QASERVE_PORT; default 50051]" in result.stdout
    assert "{auto,cpu,cuda,cuda:N,mps}" in result.stdout  # choices shown as the field defines them
    assert "--auth-tokens " not in result.stdout  # environment only


def test_version_and_usage(ran: dict[str, Ran], capsys: pytest.CaptureFixture[str]) -> None:
    assert ran["version"].code == 0
    assert ran["version"].stdout == f"qaserve {qaserve.__version__}\n"
    assert main(["--help"]) == 0 and "qaserve serve" in capsys.readouterr().out
    assert main([]) == 2 and "usage: qaserve serve" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"qaserve {qaserve.__version__}\n"


def test_address_in_use_exits_1_with_one_line(ran: dict[str, Ran]) -> None:
    result = ran["port-in-use"]
    assert result.code == 1, result
    ours = [line for line in result.stderr_lines if "qaserve" in line]
    assert len(ours) == 1 and "cannot listen" in ours[0] and "127.0.0.1:" in ours[0], result.stderr
    assert "Traceback" not in result.stderr


def test_failed_preload_exits_1_and_logs_no_token(ran: dict[str, Ran]) -> None:
    result = ran["preload-fails"]
    assert result.code == 1, result
    assert TOKEN not in result.stderr and TOKEN not in result.stdout
    messages = [json.loads(line)["message"] for line in result.stderr_lines if line.startswith("{")]
    settings_line = next(m for m in messages if m.startswith("settings: "))
    assert "auth_tokens=<redacted>" in settings_line and "log_level='DEBUG'" in settings_line
    assert messages[-1].startswith("start-up failed: "), messages


def test_configuration_errors_show_no_traceback(ran: dict[str, Ran]) -> None:
    shown = [name for name, result in ran.items() if "Traceback" in result.stderr]
    assert shown in ([], ["preload-fails"])  # a model that fails to load is logged with its traceback
