"""Settings: every flag and QASERVE_* variable, with its type, range, default and help on one field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from qaserve.runtime.backends import backend_choices

# The embedded default model ships in the repository (and the image) next to the server package.
EMBEDDED_MODEL = Path(__file__).resolve().parents[3] / "models" / "minilm-l6-squadshifts"
ENV_PREFIX = "QASERVE_"


class ConfigError(ValueError):
    """A bad setting or models file; the message is one line naming the flag, variable or key."""


def _existing_file(path: str) -> str:
    if path and not Path(path).expanduser().is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _known_backend(name: str) -> str:
    if name not in backend_choices():  # read when validating: backends added to the table count
        raise ValueError(f"{name!r} is not allowed; expected one of {', '.join(backend_choices())}")
    return name


BACKENDS_ALLOWED: JsonDict = {"allowed": ", ".join(backend_choices())}  # for help and the docs table
Backend = Annotated[str, AfterValidator(_known_backend), Field(json_schema_extra=BACKENDS_ALLOWED)]
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
    http_port: Port = Field(
        8080, description="HTTP/JSON port on --host: Hugging Face task schema, qaserve JSON, Open Inference Protocol "
        "v2 and a page for browsers (0 turns it off)"
    )  # fmt: skip
    http_cors_origins: str = Field(
        "", description="comma-separated origins browsers may call the HTTP port from, or * (default: none, no CORS)"
    )
    http_read_timeout_seconds: float = Field(
        30.0, gt=0, description="longest an HTTP client may take to send a request's headers, and again its body"
    )
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
    max_passages: int = Field(100, ge=1, description="most passages in one Read request")
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
    replicas_per_device: int = Field(
        0, ge=0, description="model replicas (forward threads) per device; 0 = by the batching policy (CPU: one "
        "single-threaded replica per core plus one with every core for a lone request; GPU: 1)"
    )  # fmt: skip
    intra_op_threads: int = Field(
        0, ge=0, description="threads of one forward pass (torch and onnx); 0 = by the batching policy"
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
        "", description="OTLP collector for traces, e.g. http://otel-collector:4317 (gRPC), or :4318 with "
        "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (default: the OTEL_* environment; tracing is off without either)"
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
        if self.http_port and self.http_port in (self.port, self.health_port, self.metrics_port):
            raise ValueError("--http-port must differ from --port, --health-port and --metrics-port")
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
