"""Server settings and the models file: typed, validated once at start, every bad value named in one line."""

from __future__ import annotations

import argparse
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from qaserve import __version__
from qaserve.qa.types import MAX_TOP_K
from qaserve.qa.windowing import MIN_MAX_SEQ_LEN
from qaserve.runtime.spec import ModelsConfig, ModelSpec

# The embedded default model ships in the repository (and the image) next to the server package.
EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "models" / "minilm-l6-squadshifts"
ENV_PREFIX = "QASERVE_"


class ConfigError(ValueError):
    """A bad setting or models file; the message is one line naming the flag, variable or key."""


def _existing_file(path: str) -> str:
    if path and not Path(path).expanduser().is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


Backend = Literal["auto", "torch", "onnx"]
Dtype = Literal["auto", "float32", "float16", "bfloat16", "int8"]
DEVICES: JsonDict = {"allowed": "auto, cpu, cuda, cuda:N, mps"}  # the pattern below, in words
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:[0-9]+|mps)$", json_schema_extra=DEVICES)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)]
FilePath = Annotated[str, AfterValidator(_existing_file)]
Port = Annotated[int, Field(ge=0, le=65535)]


class Settings(BaseSettings):
    """Everything configurable: flags win over QASERVE_<NAME> environment variables, which win over defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid")

    models_config: str = Field(
        "", description="TOML file naming the models to serve (see deploy/models.example.toml); replaces --model"
    )
    model: str = Field(
        str(EMBEDDED_MODEL),
        description="model directory or hub id to serve",
        json_schema_extra={"default_text": "the embedded model (models/minilm-l6-squadshifts)"},
    )
    model_name: str = Field("", description="name clients use for --model (default: the directory name)")
    revision: str = Field("", description="hub revision (branch, tag or commit) when --model is a hub id")
    host: str = Field("[::]", description="address the gRPC server listens on")
    port: Port = Field(50051, description="gRPC port (0 picks a free one)")
    metrics_host: str = Field("", description="address of Prometheus /metrics (default: --host)")
    metrics_port: Port = Field(9464, description="Prometheus /metrics HTTP port (0 turns it off)")
    backend: Backend = Field(
        "auto", description="inference framework; auto: onnx where a model directory holds model.onnx and the device "
        "is cpu, torch otherwise"
    )  # fmt: skip
    device: Device = Field(
        "auto", description="auto picks cuda, then mps, then cpu; cuda uses every visible GPU, cuda:N one of them"
    )
    dtype: Dtype = Field(
        "auto", description="auto: float16 on GPU, float32 on CPU (the onnx backend: the exported model's); int8 is "
        "the onnx backend's quantized model"
    )  # fmt: skip
    max_models: int = Field(4, ge=1, description="most models loaded at once; least recently used unpinned ones go")
    max_model_bytes: int = Field(0, ge=0, description="most parameter bytes of loaded models per device (0 = no limit)")
    max_context_chars: int = Field(100_000, ge=1, description="longest context accepted, in characters")
    max_in_flight: int = Field(
        1024, ge=1, description="requests admitted at once; more get RESOURCE_EXHAUSTED with a retry delay"
    )
    max_batch_windows: int = Field(32, ge=1, description="most windows in one forward pass (1 turns batching off)")
    max_batch_tokens: int = Field(
        0, ge=0, description="most padded tokens (windows x longest) per forward pass; 0 = 1024 on CPU, 65536 on GPU"
    )
    max_wait_ms: float = Field(
        2.0, ge=0, description="longest a free replica waits for windows of requests still being tokenized"
    )
    replicas_per_device: int = Field(1, ge=1, description="model replicas (forward threads) per device")
    intra_op_threads: int = Field(
        0, ge=0, description="threads of one forward pass (torch and onnx); 0 = by rule from the cores and replicas"
    )
    tokenize_threads: int = Field(2, ge=1, description="threads for tokenizing and decoding")
    response_cache_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="LRU cache of answers to repeated requests, in bytes (0 = off)"
    )
    stream_max_in_flight: int = Field(
        64, ge=1, description="AnswerMany items of one stream in progress at once (flow control)"
    )
    drain_seconds: float = Field(
        5.0, ge=0, description="on SIGTERM, how long health says NOT_SERVING while requests are still served"
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="then, how long in-flight requests get to finish (SIGINT skips the drain)"
    )
    health_port: Port = Field(
        0, description="plaintext port serving only grpc.health.v1, for kubelet probes when TLS is on (0 = none)"
    )
    max_connection_age_seconds: float = Field(
        0.0, ge=0, description="close connections after this long (GOAWAY) so clients rebalance (0 = never)"
    )
    max_connection_age_grace_seconds: float = Field(
        30.0, ge=0, description="how long calls on a connection past its age may still run"
    )
    keepalive_time_seconds: float = Field(60.0, gt=0, description="ping a client after this long without activity")
    keepalive_timeout_seconds: float = Field(
        20.0, gt=0, description="close a connection whose ping goes unanswered this long"
    )
    keepalive_min_ping_interval_seconds: float = Field(
        10.0, ge=0, description="shortest interval between client pings accepted, also without calls"
    )
    max_receive_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1, description="largest request message accepted; larger ones get RESOURCE_EXHAUSTED"
    )
    max_send_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1, description="largest response message sent; larger ones fail with RESOURCE_EXHAUSTED"
    )
    tls_cert: FilePath = Field(
        "", description="PEM certificate chain; with --tls-key serves TLS only (re-read when the files change)"
    )
    tls_key: FilePath = Field("", description="PEM private key of --tls-cert")
    tls_client_ca: FilePath = Field(
        "", description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)"
    )
    auth_tokens_file: FilePath = Field(
        "", description="bearer tokens, one a line, re-read when it changes; one of them (or of QASERVE_AUTH_TOKENS) "
        "is required on every RPC but health and reflection"
    )  # fmt: skip
    otlp_endpoint: str = Field(
        "", description="OTLP/gRPC collector for traces, e.g. http://otel-collector:4317 (default: the OTEL_* "
        "environment; tracing is off without either)"
    )  # fmt: skip
    log_level: LogLevel = Field("INFO", description="least severe level logged (any case)")
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one object per line, for log aggregation; DEBUG logs one line per request"
    )
    # Environment only: a flag's value shows in every process listing. SecretStr keeps it out of reprs and logs.
    auth_tokens: SecretStr = Field(
        SecretStr(""),
        description="comma-separated bearer tokens (QASERVE_AUTH_TOKENS only, never a flag)",
        json_schema_extra={"env_only": True},
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.health_port and self.health_port == self.port:
            raise ValueError("--health-port must differ from --port")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings  # no .env files or secret directories read behind the operator's back

    @property
    def resolved_model_name(self) -> str:
        return self.model_name or Path(self.model.rstrip("/")).name

    def describe(self) -> str:
        """The resolved settings for the start-up log, secrets redacted."""
        return " ".join(f"{name}={_shown(getattr(self, name))}" for name in type(self).model_fields)


def _shown(value: object) -> str:
    if isinstance(value, SecretStr):
        return "<redacted>" if value.get_secret_value() else "''"
    return repr(value)


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def is_env_only(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("env_only"))


# ---------------------------------------------------------------------------------------------------------------
# Flags and environment


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (the usage of ~40 flags would bury it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class _EnvOnly(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        parser.error(f"{self.option_strings[0]} is not a flag: set {self.dest.upper()} in the environment instead")


class _EnvSource(EnvSettingsSource):
    """QASERVE_* variables from a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def build_parser(prog: str = "qaserve serve") -> argparse.ArgumentParser:
    """The `qaserve serve` flags, one per Settings field: help, choices and defaults come from the field."""
    parser = _Parser(
        prog=prog,
        usage=f"{prog} [--help] [--FLAG VALUE ...]",
        description="Serve extractive question answering over gRPC. Every flag also reads QASERVE_<FLAG> from the "
        "environment (e.g. --max-in-flight: QASERVE_MAX_IN_FLIGHT); flags win over the environment.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"qaserve {__version__}")
    for name, field in Settings.model_fields.items():
        if is_env_only(field):
            parser.add_argument(
                flag_name(name),
                dest=env_name(name),
                action=_EnvOnly,
                nargs=0,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
            continue
        allowed = f" ({_allowed_text(field)})" if _has_allowed(field) else ""
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=_metavar(field),
            help=f"{field.description}{allowed} [{env_name(name)}; default {_default_text(field)}]".replace("%", "%%"),
        )
    return parser


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `qaserve serve` flags and QASERVE_* variables.

    Exits like argparse: 0 after --help, 2 with one line naming the flag or variable for any bad value.
    """
    parser = build_parser()
    flags: dict[str, Any] = vars(parser.parse_args(argv))
    try:
        return settings_from(flags, os.environ if environ is None else environ)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def settings_from(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Settings from flag values (by field name) over QASERVE_* variables; ConfigError names the culprit."""
    env = _EnvSource(Settings, environ)
    try:
        # Only these two sources: the given environment, not os.environ. (mypy sees the fields as the only keywords.)
        sources = (InitSettingsSource(Settings, dict(flags)), env)
        return Settings(_build_sources=(sources, dict(flags)))  # type: ignore[call-arg]
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        if not field:
            where = ""
        elif field in flags:
            where = flag_name(field)
        else:
            where = env_name(field)
        values = {**env(), **flags}  # what the operator wrote, before any normalising (upper-casing a log level)
        if field in values:
            first["input"] = values[field]
        raise ConfigError(_message(where, first, Settings.model_fields.get(field))) from None


# ---------------------------------------------------------------------------------------------------------------
# The models file


def _fits_max_seq_len(entry: ModelEntry) -> ModelEntry:
    if entry.doc_stride is not None and entry.max_seq_len is not None and entry.doc_stride >= entry.max_seq_len:
        raise ValueError(f"doc_stride ({entry.doc_stride}) must be smaller than max_seq_len ({entry.max_seq_len})")
    return entry


def _server(setting: str) -> JsonDict:
    return {"default_text": f"`{flag_name(setting)}`"}


class ModelEntry(BaseModel):
    """One [[models]] table. Unset keys (None) take the server-wide setting."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1, description="the name clients request; unique")
    source: str = Field(min_length=1, description="model directory (relative to the file) or hub id")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub id")
    backend: Backend | None = Field(None, description="inference framework", json_schema_extra=_server("backend"))
    device: Device | None = Field(
        None, description="device(s) of the replicas", json_schema_extra={**DEVICES, **_server("device")}
    )
    dtype: Dtype | None = Field(None, description="weights' dtype", json_schema_extra=_server("dtype"))
    replicas_per_device: int | None = Field(
        None, ge=1, description="forward threads per device", json_schema_extra=_server("replicas_per_device")
    )
    pinned: bool = Field(False, description="never evicted nor unloaded")
    preload: bool = Field(False, description="loaded before the server reports SERVING; a failure stops the start")
    warmup: bool = Field(True, description="one forward pass per replica at load")
    max_batch_windows: int | None = Field(
        None, ge=1, description="most windows per forward pass", json_schema_extra=_server("max_batch_windows")
    )
    max_batch_tokens: int | None = Field(
        None, ge=0, description="most padded tokens per forward pass; 0 = by device", json_schema_extra=_server(
            "max_batch_tokens"
        )
    )  # fmt: skip
    max_wait_ms: float | None = Field(
        None, ge=0, description="longest a free replica waits for more windows", json_schema_extra=_server(
            "max_wait_ms"
        )
    )  # fmt: skip
    max_in_flight: int | None = Field(
        None, ge=1, description="requests of this model admitted at once, within the server's --max-in-flight",
        json_schema_extra={"default_text": "no limit of its own"},
    )  # fmt: skip
    max_seq_len: int | None = Field(
        None, ge=MIN_MAX_SEQ_LEN, description="window length in tokens of requests that set none",
        json_schema_extra={"default_text": "384, or the model's limit"},
    )  # fmt: skip
    doc_stride: int | None = Field(
        None, ge=0, description="overlap of windows in tokens, for requests that set none",
        json_schema_extra={"default_text": "128 (at most half of max_seq_len)"},
    )  # fmt: skip
    max_answer_len: int | None = Field(
        None, ge=1, description="longest answer in tokens, for requests that set none",
        json_schema_extra={"default_text": "15"},
    )  # fmt: skip
    top_k: int | None = Field(
        None, ge=1, le=MAX_TOP_K, description="answers per request, for requests that set none",
        json_schema_extra={"default_text": "1"},
    )  # fmt: skip

    _check = model_validator(mode="after")(_fits_max_seq_len)


class ModelsFile(BaseModel):
    """A models TOML file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    default: str | None = Field(
        None, description="the model of requests that name none", json_schema_extra={"default_text": "the first"}
    )
    max_models: int | None = Field(
        None, ge=1, description="most models loaded at once", json_schema_extra=_server("max_models")
    )
    max_bytes_per_device: int | None = Field(
        None, ge=0, description="parameter bytes of loaded models per device, 0 = no limit",
        json_schema_extra=_server("max_model_bytes"),
    )  # fmt: skip
    models: list[ModelEntry] = Field(min_length=1, description="one [[models]] table per model")

    @model_validator(mode="after")
    def _names(self) -> ModelsFile:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default {self.default!r} is not a configured model (configured: {', '.join(names)})")
        return self


def models_config(settings: Settings) -> ModelsConfig:
    """The configured models: from --models-config, or --model alone (pinned and preloaded)."""
    if not settings.models_config:
        spec = ModelSpec(
            name=settings.resolved_model_name,
            source=settings.model,
            revision=settings.revision or None,
            backend=settings.backend,
            device=settings.device,
            dtype=settings.dtype,
            replicas_per_device=settings.replicas_per_device,
            pinned=True,
            preload=True,
        )
        return ModelsConfig((spec,), spec.name, settings.max_models, settings.max_model_bytes)
    return load_models_config(Path(settings.models_config).expanduser(), settings)


def load_models_config(path: Path, settings: Settings) -> ModelsConfig:
    """Reads a models TOML file (see deploy/models.example.toml); relative sources resolve against its directory.

    Pure: reads the file and nothing else, so a reload calls it again. ConfigError names the model and key.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    try:
        parsed = ModelsFile.model_validate(data)
    except ValidationError as error:
        # An unknown key first: a misspelt key is also why a required one seems missing.
        first = min(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise ConfigError(f"{path}: {_models_file_message(first, data)}") from None
    specs = tuple(_spec(entry, path, settings) for entry in parsed.models)
    return ModelsConfig(
        specs,
        parsed.default if parsed.default is not None else specs[0].name,
        parsed.max_models if parsed.max_models is not None else settings.max_models,
        parsed.max_bytes_per_device if parsed.max_bytes_per_device is not None else settings.max_model_bytes,
    )


# ModelEntry keys that default to the server's setting of the same name when unset.
_INHERITED = ("backend", "device", "dtype", "replicas_per_device")


def _spec(entry: ModelEntry, path: Path, settings: Settings) -> ModelSpec:
    source = entry.source
    local = Path(source).expanduser()
    local = local if local.is_absolute() else path.parent / local
    if local.exists() or source.startswith((".", "/", "~")):
        source = str(local.resolve())
    # Every key of an entry is a ModelSpec field of the same name.
    inherited = {key: getattr(settings, key) for key in _INHERITED if getattr(entry, key) is None}
    return ModelSpec(**{**entry.model_dump(), **inherited, "source": source, "revision": entry.revision or None})


def _models_file_message(error: ErrorDetails, data: Mapping[str, Any]) -> str:
    loc = error["loc"]
    if loc[:1] == ("models",) and len(loc) >= 2 and isinstance(loc[1], int):
        entries = data.get("models")
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        which = f"model {name!r}" if isinstance(name, str) else f"[[models]] #{loc[1] + 1}"
        key = str(loc[2]) if len(loc) > 2 else ""
        field = ModelEntry.model_fields.get(key)
        if error["type"] == "extra_forbidden":
            return f"{which}: unknown key {key!r} (keys: {', '.join(ModelEntry.model_fields)})"
        return f"{which}: {_message(key, error, field)}"
    if loc[:1] == ("models",) and len(loc) == 1 and error["type"] == "list_type":
        return "models: must be [[models]] tables"
    key = str(loc[0]) if loc else ""
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r} (keys: {', '.join(ModelsFile.model_fields)})"
    if key == "models" and error["type"] in ("missing", "too_short"):
        return "no [[models]] configured"
    return _message(key, error, ModelsFile.model_fields.get(key))


# ---------------------------------------------------------------------------------------------------------------
# One-line messages from pydantic errors


def _message(where: str, error: ErrorDetails, field: FieldInfo | None) -> str:
    prefix = f"{where}: " if where else ""
    if error["type"] == "missing":
        return f"{prefix}required"
    if error["type"] == "value_error" or field is None:
        text = str(error.get("ctx", {}).get("error", error["msg"])) if error["type"] == "value_error" else error["msg"]
        return f"{prefix}{text}"
    return f"{prefix}{_input_text(error['input'])} is not allowed; expected {_allowed_text(field)}"


def _input_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _unwrapped(annotation: Any) -> Any:
    """X from X | None and Annotated[X, ...]."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        else:
            return annotation


def _choices(field: FieldInfo) -> tuple[str, ...]:
    annotation = _unwrapped(field.annotation)
    return tuple(typing.get_args(annotation)) if typing.get_origin(annotation) is Literal else ()


def _kind(field: FieldInfo) -> str:
    annotation = _unwrapped(field.annotation)
    return {int: "int", float: "number", bool: "bool"}.get(annotation, "str")


def _metavar(field: FieldInfo) -> str:
    choices = _choices(field)
    if choices:
        return "{" + ",".join(choices) + "}"
    if isinstance(field.json_schema_extra, dict) and "allowed" in field.json_schema_extra:
        return "{" + str(field.json_schema_extra["allowed"]).replace(" ", "") + "}"
    return {"int": "N", "number": "X", "bool": "BOOL", "str": "TEXT"}[_kind(field)]


def _has_allowed(field: FieldInfo) -> bool:
    """Whether a field accepts less than any string."""
    extra = field.json_schema_extra
    return _kind(field) != "str" or bool(_choices(field)) or (isinstance(extra, dict) and "allowed" in extra)


def _allowed_text(field: FieldInfo) -> str:
    """What a field accepts, in words: its choices, its range, or its type."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "allowed" in extra:
        return f"one of {extra['allowed']}"
    choices = _choices(field)
    if choices:
        return "one of " + ", ".join(choices)
    kind = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string"}[_kind(field)]
    low = next((f">= {m.ge}" for m in field.metadata if isinstance(m, annotated_types.Ge)), "")
    low = low or next((f"> {m.gt}" for m in field.metadata if isinstance(m, annotated_types.Gt)), "")
    high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    if high is None:
        return f"{kind} {low}".strip()
    if low.startswith(">="):
        return f"{kind} from {low[3:]} to {high}"
    return f"{kind} {low} and <= {high}".strip()


def _default_text(field: FieldInfo) -> str:
    if isinstance(field.json_schema_extra, dict) and "default_text" in field.json_schema_extra:
        return str(field.json_schema_extra["default_text"])
    default = field.get_default()
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    return "unset" if default in ("", None) else str(default).lower() if isinstance(default, bool) else str(default)


def markdown_tables() -> str:
    """The README's tables of settings and models-file keys, made from the fields (a test keeps them equal)."""
    rows = ["| flag | default | allowed | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        allowed = _allowed_text(field) if _has_allowed(field) else ""
        shown = f"`{env_name(name)}` (environment only)" if is_env_only(field) else f"`{flag_name(name)}`"
        rows.append(f"| {shown} | {_default_text(field)} | {allowed} | {field.description} |")
    rows += ["", "| models file key | default | allowed | meaning |", "|---|---|---|---|"]
    for model in (ModelsFile, ModelEntry):
        for name, field in model.model_fields.items():
            if name == "models":
                continue
            key = f"`[[models]]` `{name}`" if model is ModelEntry else f"`{name}`"
            default = "required" if field.is_required() else _default_text(field)
            allowed = _allowed_text(field) if _has_allowed(field) else ""
            rows.append(f"| {key} | {default} | {allowed} | {field.description} |")
    return "\n".join(rows) + "\n"
