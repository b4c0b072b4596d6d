"""Settings from flags and QASERVE_* variables; the models TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from qaserve.config import EMBEDDED_MODEL, Settings, load_models_config, models_config, parse_settings


def test_defaults_serve_the_embedded_model() -> None:
    settings = parse_settings([], environ={})
    assert settings == Settings()
    config = models_config(settings)
    [spec] = config.models
    assert (spec.name, spec.source) == ("minilm-l6-squadshifts", str(EMBEDDED_MODEL))
    assert spec.pinned and spec.preload and config.default == spec.name


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    env = {"QASERVE_PORT": "6000", "QASERVE_DEVICE": "cpu", "QASERVE_MAX_WAIT_MS": "0.5"}
    settings = parse_settings(["--port", "7000"], environ=env)
    assert settings.port == 7000
    assert settings.device == "cpu"
    assert settings.max_wait_ms == 0.5


@pytest.mark.parametrize("argv", [["--max-in-flight", "0"], ["--port", "-1"], ["--max-batch-windows", "0"]])
def test_out_of_range_settings_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, environ={})


def test_models_file_resolves_relative_sources_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    path = tmp_path / "models.toml"
    path.write_text(
        'max_models = 3\n[[models]]\nname = "a"\nsource = "a"\npinned = true\n'
        '[[models]]\nname = "hub"\nsource = "org/model"\nrevision = "main"\n'
    )
    config = load_models_config(path, Settings(device="cpu"))
    a, hub = config.models
    assert a.source == str((tmp_path / "a").resolve()) and a.pinned and a.device == "cpu"
    assert (hub.source, hub.revision) == ("org/model", "main")  # a hub id stays an id
    assert (config.default, config.max_models) == ("a", 3)


@pytest.mark.parametrize(
    "text",
    [
        "",
        '[[models]]\nname = "a"\n',
        '[[models]]\nname = "a"\nsource = "a"\ntrust_remote_code = true\n',
        '[[models]]\nname = "a"\nsource = "a"\n[[models]]\nname = "a"\nsource = "b"\n',
        'default = "b"\n[[models]]\nname = "a"\nsource = "a"\n',
    ],
    ids=["empty", "no-source", "unknown-key", "duplicate", "bad-default"],
)
def test_bad_models_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ValueError):
        load_models_config(path, Settings())
