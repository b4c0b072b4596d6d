"""Settings from flags and QASERVE_* variables; the models TOML file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qaserve.config import (
    EMBEDDED_MODEL,
    ConfigError,
    ModelEntry,
    ModelsFile,
    Settings,
    build_parser,
    env_name,
    flag_name,
    is_env_only,
    load_models_config,
    markdown_tables,
    models_config,
    parse_settings,
)
from qaserve.config.models_file import INHERITED
from qaserve.qa.types import MAX_TOP_K
from qaserve.qa.windowing import MIN_MAX_SEQ_LEN
from qaserve.runtime.spec import ModelSpec

CONFIGURATION_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults_serve_the_embedded_model() -> None:
    settings = parse_settings([], environ={})
    assert settings == Settings()
    config = models_config(settings)
    [spec] = config.models
    assert (spec.name, spec.source) == ("minilm-l6-squadshifts", str(EMBEDDED_MODEL))
    assert spec.pinned and spec.preload and config.default == spec.name
    assert (settings.metrics_port, settings.metrics_host, settings.backend) == (9464, "", "auto")
    assert (settings.intra_op_threads, settings.response_cache_bytes, settings.otlp_endpoint) == (0, 64 << 20, "")


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    env = {"QASERVE_PORT": "6000", "QASERVE_DEVICE": "cpu", "QASERVE_MAX_WAIT_MS": "0.5", "QASERVE_BACKEND": "onnx"}
    settings = parse_settings(["--port", "7000", "--backend", "torch"], environ=env)
    assert (settings.port, settings.backend) == (7000, "torch")
    assert settings.device == "cpu"
    assert settings.max_wait_ms == 0.5
    assert settings.max_in_flight == Settings.model_fields["max_in_flight"].default


def test_empty_variables_mean_unset() -> None:
    assert parse_settings([], environ={"QASERVE_PORT": ""}).port == 50051


def test_log_level_is_case_insensitive_and_devices_follow_the_pattern() -> None:
    assert parse_settings(["--log-level", "warning"], environ={}).log_level == "WARNING"
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert parse_settings(["--device", device], environ={}).device == device


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-in-flight", "0"], {}, "--max-in-flight: '0' is not allowed; expected an integer >= 1"),
        (["--port", "-1"], {}, "--port: '-1' is not allowed; expected an integer from 0 to 65535"),
        (["--port", "70000"], {}, "--port: '70000' is not allowed; expected an integer from 0 to 65535"),
        (["--max-wait-ms", "2.5.1"], {}, "--max-wait-ms: '2.5.1' is not allowed; expected a number >= 0"),
        ([], {"QASERVE_PORT": "abc"}, "QASERVE_PORT: 'abc' is not allowed; expected an integer from 0 to 65535"),
        (["--device", "cuda:x"], {}, "--device: 'cuda:x' is not allowed; expected one of auto, cpu, cuda, cuda:N, mps"),
        ([], {"QASERVE_DTYPE": "fp16"}, "QASERVE_DTYPE: 'fp16' is not allowed; expected one of auto, float32"),
        (["--intra-op-threads", "-2"], {}, "--intra-op-threads: '-2' is not allowed; expected an integer >= 0"),
        (["--response-cache-bytes", "lots"], {}, "--response-cache-bytes: 'lots' is not allowed; expected an integer"),
        (["--health-port", "50051"], {}, "--health-port must differ from --port"),
        (["--tls-cert", "/nonexistent.crt"], {}, "--tls-cert: no such file: /nonexistent.crt"),
        (["--no-such-flag", "1"], {}, "unrecognized arguments: --no-such-flag 1"),
    ],
)
def test_bad_settings_exit_2_naming_the_flag_or_variable(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit:
        parse_settings(argv, environ=env)
    assert exit.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"qaserve serve: error: {message}"), line


def test_tokens_are_a_secret_from_the_environment_only(capsys: pytest.CaptureFixture[str]) -> None:
    settings = parse_settings([], environ={"QASERVE_AUTH_TOKENS": "s3cret,other"})
    assert settings.auth_tokens.get_secret_value() == "s3cret,other"
    for shown in (repr(settings), str(settings), settings.describe(), settings.model_dump_json()):
        assert "s3cret" not in shown
    assert "auth_tokens=<redacted>" in settings.describe()
    with pytest.raises(SystemExit):
        parse_settings(["--auth-tokens", "s3cret"], environ={})
    assert "s3cret" not in capsys.readouterr().err


def test_every_setting_has_a_flag_a_variable_and_help() -> None:
    help_text = build_parser().format_help()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        if is_env_only(field):
            assert f"{flag_name(name)} " not in help_text
        else:
            assert f"{flag_name(name)} " in help_text and f"[{env_name(name)};" in help_text, name


def test_configuration_doc_tables_are_the_fields() -> None:
    """docs/configuration.md's tables of flags and models-file keys come from the fields: every setting, every key."""
    tables = markdown_tables()
    doc = CONFIGURATION_DOC.read_text()
    for table in tables.split("\n\n"):
        assert table in doc, "regenerate docs/configuration.md's tables with qaserve.config.markdown_tables()"
    for name, field in Settings.model_fields.items():
        assert (f"`{env_name(name)}`" if is_env_only(field) else f"`{flag_name(name)}`") in tables, name
    for key in ModelEntry.model_fields.keys() | ModelsFile.model_fields.keys() - {"models"}:
        assert f"`{key}`" in tables, key


def test_request_limits_match_the_qa_core() -> None:
    assert ModelEntry.model_fields["top_k"].metadata[-1].le == MAX_TOP_K
    assert ModelEntry.model_fields["max_seq_len"].metadata[0].ge == MIN_MAX_SEQ_LEN


# ---------------------------------------------------------------------------------------------------------------
# The models file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_models_file_resolves_relative_sources_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    path = write(
        tmp_path,
        'max_models = 3\n[[models]]\nname = "a"\nsource = "a"\npinned = true\n'
        '[[models]]\nname = "hub"\nsource = "org/model"\nrevision = "main"\n',
    )
    config = load_models_config(path, Settings(device="cpu", backend="onnx", replicas_per_device=2))
    a, hub = config.models
    assert a.source == str((tmp_path / "a").resolve()) and a.pinned and a.device == "cpu"
    assert (a.backend, a.replicas_per_device, a.warmup, a.preload) == ("onnx", 2, True, False)
    assert (hub.source, hub.revision) == ("org/model", "main")  # a hub id stays an id
    assert (config.default, config.max_models, config.max_bytes_per_device) == ("a", 3, 0)


def test_per_model_settings_reach_the_spec(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'default = "b"\nmax_bytes_per_device = 1000\n'
        '[[models]]\nname = "a"\nsource = "/models/a"\n'
        '[[models]]\nname = "b"\nsource = "/models/b"\nbackend = "torch"\ndevice = "cuda:1"\ndtype = "bfloat16"\n'
        "replicas_per_device = 2\npreload = true\nwarmup = false\n"
        "max_batch_windows = 8\nmax_batch_tokens = 4096\nmax_wait_ms = 1\nmax_in_flight = 100\n"
        "max_seq_len = 256\ndoc_stride = 64\nmax_answer_len = 30\ntop_k = 3\n",
    )
    config = load_models_config(path, Settings(max_batch_windows=16, max_batch_tokens=512, max_wait_ms=0.5))
    a, b = config.models
    assert (config.default, config.max_models, config.max_bytes_per_device) == ("b", 4, 1000)
    # Unset batching keys take the server-wide settings, filled in here; max_in_flight unset is no limit of its own.
    assert (a.max_batch_windows, a.max_batch_tokens, a.max_wait_ms, a.max_in_flight) == (16, 512, 0.5, None)
    assert (a.max_seq_len, a.doc_stride, a.max_answer_len, a.top_k) == (None, None, None, None)
    assert (b.backend, b.device, b.dtype, b.replicas_per_device, b.preload, b.warmup) == (
        "torch", "cuda:1", "bfloat16", 2, True, False
    )  # fmt: skip
    assert (b.max_batch_windows, b.max_batch_tokens, b.max_wait_ms, b.max_in_flight) == (8, 4096, 1.0, 100)
    assert (b.max_seq_len, b.doc_stride, b.max_answer_len, b.top_k) == (256, 64, 30, 3)


def test_reading_again_sees_the_new_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[[models]]\nname = "a"\nsource = "/m/a"\n')
    first = load_models_config(path, Settings())
    write(tmp_path, '[[models]]\nname = "a"\nsource = "/m/a"\n[[models]]\nname = "b"\nsource = "/m/b"\n')
    second = load_models_config(path, Settings())
    assert [m.name for m in first.models] == ["a"] and [m.name for m in second.models] == ["a", "b"]


ONE = '[[models]]\nname = "a"\nsource = "a"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no [[models]] configured"),
        ('[[models]]\nname = "a"\n', "model 'a': source: required"),
        (ONE + "trust_remote_code = true\n", "model 'a': unknown key 'trust_remote_code' (keys: name, source,"),
        (ONE + 'pinned = "no"\n', "model 'a': pinned: 'no' is not allowed; expected true or false"),
        (ONE + 'preload = "false"\n', "model 'a': preload: 'false' is not allowed; expected true or false"),
        (ONE + "warmup = 1\n", "model 'a': warmup: 1 is not allowed; expected true or false"),
        (ONE + "replicas_per_device = -1\n", "model 'a': replicas_per_device: -1 is not allowed; expected an integer"),
        (ONE + 'replicas_per_device = "2"\n', "model 'a': replicas_per_device: '2' is not allowed"),
        (ONE + 'device = "gpu"\n', "model 'a': device: 'gpu' is not allowed; expected one of auto, cpu, cuda,"),
        (ONE + 'dtype = "fp16"\n', "model 'a': dtype: 'fp16' is not allowed; expected one of auto, float32"),
        (ONE + 'backend = "trt"\n', "model 'a': backend: 'trt' is not allowed; expected one of auto, torch, onnx"),
        (ONE + "top_k = 50\n", "model 'a': top_k: 50 is not allowed; expected an integer from 1 to 20"),
        (ONE + "max_in_flight = 0\n", "model 'a': max_in_flight: 0 is not allowed; expected an integer >= 1"),
        (ONE + "max_seq_len = 64\ndoc_stride = 64\n", "model 'a': doc_stride (64) must be smaller than max_seq_len"),
        (ONE + ONE.replace('source = "a"', 'source = "b"'), "model names must be unique; repeated: a"),
        ('default = "b"\n' + ONE, "default 'b' is not a configured model (configured: a)"),
        ("max_model = 2\n" + ONE, "unknown key 'max_model' (keys: default, max_models, max_bytes_per_device, models)"),
        ('max_models = "2"\n' + ONE, "max_models: '2' is not allowed; expected an integer >= 1"),
        ('[[models]]\nname = "a"\nsource = "a"\nsourse = "b"\n', "model 'a': unknown key 'sourse'"),
        ("models = [1]\n", "[[models]] #1: "),
        ("[[models]\n", "not valid TOML: "),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_bad_models_files_are_refused_naming_model_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_models_config(path, Settings())
    assert str(caught.value).startswith(f"{path}: {message}"), caught.value
    assert "\n" not in str(caught.value)


def test_a_missing_models_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no-such\.toml: cannot read"):
        models_config(Settings(models_config=str(tmp_path / "no-such.toml")))


def test_the_models_file_keys_are_the_model_spec_fields() -> None:
    assert list(ModelEntry.model_fields) == [f.name for f in dataclasses.fields(ModelSpec)]


def test_a_model_spec_made_in_code_runs_with_the_servers_default_settings() -> None:
    spec = ModelSpec("m", "/models/m")
    for key in INHERITED:
        assert getattr(spec, key) == Settings.model_fields[key].default, key


def test_a_single_model_runs_with_the_servers_settings() -> None:
    settings = Settings(model="/models/m", max_batch_windows=8, max_batch_tokens=256, max_wait_ms=1.5, dtype="float16")
    (spec,) = models_config(settings).models
    assert (spec.max_batch_windows, spec.max_batch_tokens, spec.max_wait_ms, spec.dtype) == (8, 256, 1.5, "float16")
    assert (spec.pinned, spec.preload) == (True, True)
