"""Server settings: one object, built once in main from flags and QASERVE_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qaserve.runtime.spec import ModelsConfig, ModelSpec

# The embedded default model ships in the repository (and the image) next to the server package.
EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "models" / "minilm-l6-squadshifts"


@dataclass(frozen=True)
class Settings:
    """Everything configurable; flags win over QASERVE_<NAME> environment variables, which win over defaults."""

    models_config: str = ""  # a TOML file naming several models; "" = serve --model alone
    model: str = str(EMBEDDED_MODEL)
    model_name: str = ""  # "" = the model directory's name (or the hub id's last part)
    revision: str = ""
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9464  # OpenTelemetry's Prometheus exporter port; 9090 is the Prometheus server's own
    metrics_host: str = ""  # "" = --host
    otlp_endpoint: str = ""  # "" = as OTEL_EXPORTER_OTLP_ENDPOINT says (tracing off when nothing turns it on)
    device: str = "auto"
    dtype: str = "auto"
    max_models: int = 4
    max_model_bytes: int = 0  # per device; 0 = no byte budget
    max_context_chars: int = 100_000
    max_in_flight: int = 1024
    max_batch_windows: int = 32
    max_batch_tokens: int = 0  # 0 = by device: 1024 on CPU, 65536 on GPU
    max_wait_ms: float = 2.0
    replicas_per_device: int = 1
    intra_op_threads: int = 0  # 0 = by rule (qaserve.runtime.backends.threads_per_replica)
    tokenize_threads: int = 2
    stream_max_in_flight: int = 64
    response_cache_bytes: int = 64 * 1024 * 1024  # 0 = no response cache
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    # Deployment and security (README "Deployment" and "Security").
    log_format: str = "text"  # text | json (one object per line)
    drain_seconds: float = 5.0  # on SIGTERM: NOT_SERVING but still serving this long, then stop with grace
    health_port: int = 0  # a plaintext port serving only grpc.health.v1 (for kubelet probes under TLS); 0 = none
    max_connection_age_seconds: float = 0.0  # 0 = connections live forever
    max_connection_age_grace_seconds: float = 30.0
    keepalive_time_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    keepalive_min_ping_interval_seconds: float = 10.0
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_send_message_bytes: int = 4 * 1024 * 1024
    tls_cert: str = ""  # PEM certificate chain; with tls_key turns TLS on
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA bundle; turns mutual TLS on (clients must present a certificate it signed)
    auth_tokens_file: str = ""  # one bearer token per line; re-read when it changes
    # Comma-separated; from QASERVE_AUTH_TOKENS only, never a flag (see ENV_ONLY), and never in a repr.
    auth_tokens: str = dataclasses.field(default="", repr=False)

    @property
    def resolved_model_name(self) -> str:
        return self.model_name or Path(self.model.rstrip("/")).name

    def describe(self) -> str:
        """The resolved settings for the start-up log, secrets redacted."""
        return " ".join(
            f"{f.name}={'<redacted>' if f.name in SECRETS and getattr(self, f.name) else repr(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
        )


# Settings never logged as they are.
SECRETS = frozenset({"auth_tokens"})
# Settings read from QASERVE_<NAME> only: a flag's value shows in every process listing.
ENV_ONLY = frozenset({"auth_tokens"})


HELP = {
    "models_config": "TOML file configuring several models (see deploy/models.example.toml); overrides --model",
    "max_models": "most models loaded at once; least recently used unpinned ones are evicted",
    "max_model_bytes": "most parameter bytes of loaded models per device (0 = no limit)",
    "model": "model directory or hub id to serve (default: the embedded model)",
    "model_name": "name clients use for the model (default: the directory name)",
    "revision": "hub revision (branch, tag or commit) when --model is a hub id",
    "host": "address to bind the gRPC server to",
    "port": "gRPC port (0 picks a free one)",
    "metrics_port": "Prometheus /metrics HTTP port (0 disables it)",
    "metrics_host": "address the /metrics listener binds to, IPv6 included ([::], ::1); default: --host",
    "otlp_endpoint": "OTLP/gRPC collector for traces, e.g. http://otel-collector:4317 (turns tracing on; "
    "OTEL_* variables configure the rest)",
    "device": "auto|cpu|cuda|cuda:N|mps; auto picks cuda, then mps, then cpu; cuda uses every visible GPU",
    "dtype": "auto|float32|float16|bfloat16; auto is float16 on GPU, float32 on CPU",
    "max_context_chars": "longest context accepted, in characters",
    "max_in_flight": "requests admitted at once; more get RESOURCE_EXHAUSTED with a retry delay",
    "max_batch_windows": "most windows in one forward pass (1 turns batching off)",
    "max_batch_tokens": "most padded tokens (windows x longest) per forward pass; 0 = 1024 on CPU, 65536 on GPU",
    "max_wait_ms": "longest a free replica waits for windows of requests still being tokenized",
    "replicas_per_device": "model replicas (forward threads) per device",
    "intra_op_threads": "threads one replica's forward pass uses, torch and ONNX Runtime alike (0 = the CPU's cores "
    "split between the model's replicas on it; 1 on a GPU)",
    "tokenize_threads": "threads for tokenizing and decoding",
    "stream_max_in_flight": "AnswerMany items of one stream in progress at once (flow control)",
    "response_cache_bytes": "bytes of recent answers kept to answer repeated requests without the model (0 = off)",
    "grace_seconds": "on SIGTERM/SIGINT, how long in-flight requests get to finish",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text or json (one JSON object per line, for log aggregation); DEBUG logs one line per request",
    "drain_seconds": "on SIGTERM, how long health says NOT_SERVING while new and in-flight requests are still served, "
    "before --grace-seconds",
    "health_port": "plaintext port serving only grpc.health.v1, for kubelet gRPC probes when TLS is on (0 = none)",
    "max_connection_age_seconds": "close connections after this long (GOAWAY) so clients re-resolve and rebalance "
    "(0 = never)",
    "max_connection_age_grace_seconds": "how long calls on a connection past its age may still run",
    "keepalive_time_seconds": "ping a client after this long without activity",
    "keepalive_timeout_seconds": "close a connection whose ping goes unanswered this long",
    "keepalive_min_ping_interval_seconds": "shortest interval between client pings accepted, also without calls",
    "max_receive_message_bytes": "largest request message accepted; larger ones get RESOURCE_EXHAUSTED",
    "max_send_message_bytes": "largest response message sent; larger ones fail with RESOURCE_EXHAUSTED",
    "tls_cert": "PEM certificate chain; with --tls-key serves TLS only (re-read when the files change)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: require clients to present a certificate it signed (mutual TLS)",
    "auth_tokens_file": "file of bearer tokens, one a line, re-read when it changes; any one of them, or of "
    "QASERVE_AUTH_TOKENS (comma-separated, environment only), is required on every RPC but health and reflection",
    "auth_tokens": "comma-separated bearer tokens (environment QASERVE_AUTH_TOKENS only)",
}


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Settings:
    """Builds Settings from `qaserve serve` flags and QASERVE_* variables."""
    parser = argparse.ArgumentParser(prog="qaserve serve", description="Serve extractive question answering over gRPC.")
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        if field.name in ENV_ONLY:
            continue
        kind = type(getattr(defaults, field.name))
        env_name = f"QASERVE_{field.name.upper()}"
        default = getattr(defaults, field.name)
        if env_name in environ:
            default = kind(environ[env_name])
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=kind,
            default=default,
            help=f"{HELP[field.name]} [env {env_name}; default %(default)s]",
        )
    args = parser.parse_args(argv)
    env_only: dict[str, Any] = {name: environ.get(f"QASERVE_{name.upper()}", "") for name in ENV_ONLY}
    settings = Settings(**vars(args), **env_only)
    _check(settings, parser)
    return settings


def _check(s: Settings, parser: argparse.ArgumentParser) -> None:
    positive = (
        "max_models",
        "max_context_chars",
        "max_in_flight",
        "max_batch_windows",
        "stream_max_in_flight",
        "replicas_per_device",
        "max_receive_message_bytes",
        "max_send_message_bytes",
    )
    for name in positive:
        if getattr(s, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in (
        "port", "metrics_port", "intra_op_threads", "max_wait_ms", "grace_seconds", "max_batch_tokens",
        "max_model_bytes",
    ):  # fmt: skip
        if getattr(s, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if s.tokenize_threads < 1:
        parser.error("--tokenize-threads must be at least 1")
    _check_deployment(s, parser)


def _check_deployment(s: Settings, parser: argparse.ArgumentParser) -> None:
    for name in (
        "drain_seconds",
        "health_port",
        "max_connection_age_seconds",
        "max_connection_age_grace_seconds",
        "keepalive_min_ping_interval_seconds",
    ):
        if getattr(s, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    for name in ("keepalive_time_seconds", "keepalive_timeout_seconds"):
        if getattr(s, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if s.log_format not in ("text", "json"):
        parser.error("--log-format must be text or json")
    if s.health_port and s.health_port == s.port:
        parser.error("--health-port must differ from --port")
    if bool(s.tls_cert) != bool(s.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if s.tls_client_ca and not s.tls_cert:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
        path = getattr(s, name)
        if path and not Path(path).is_file():
            parser.error(f"--{name.replace('_', '-')}: no such file: {path}")


def models_config(settings: Settings) -> ModelsConfig:
    """The configured models: from --models-config, or --model alone (pinned and preloaded)."""
    if not settings.models_config:
        spec = ModelSpec(
            name=settings.resolved_model_name,
            source=settings.model,
            revision=settings.revision or None,
            device=settings.device,
            dtype=settings.dtype,
            replicas_per_device=settings.replicas_per_device,
            pinned=True,
            preload=True,
        )
        return ModelsConfig((spec,), spec.name, settings.max_models, settings.max_model_bytes)
    return load_models_config(Path(settings.models_config), settings)


def load_models_config(path: Path, settings: Settings) -> ModelsConfig:
    """Reads a models TOML file; relative sources resolve against the file's directory.

    default = "minilm"                 # optional; the first model otherwise
    max_models = 2                     # optional; --max-models otherwise
    max_bytes_per_device = 2000000000  # optional; --max-model-bytes otherwise
    [[models]]
    name = "minilm"
    source = "../models/minilm-l6-squadshifts"
    pinned = true                      # and optionally: preload, warmup, device, dtype, revision,
                                       # replicas_per_device
    """
    with path.open("rb") as f:
        data = tomllib.load(f)
    unknown = set(data) - {"default", "max_models", "max_bytes_per_device", "models"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    entries: list[dict[str, Any]] = data.get("models", [])
    if not entries:
        raise ValueError(f"{path}: no [[models]] configured")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    specs = []
    for entry in entries:
        if not {"name", "source"} <= entry.keys():
            raise ValueError(f"{path}: every [[models]] needs a name and a source")
        if set(entry) - fields:
            raise ValueError(f"{path}: model {entry['name']!r} has unknown keys {sorted(set(entry) - fields)}")
        values: dict[str, Any] = {
            "device": settings.device,
            "dtype": settings.dtype,
            "replicas_per_device": settings.replicas_per_device,
        }
        values.update(entry)
        source = Path(str(values["source"])).expanduser()
        local = source if source.is_absolute() else path.parent / source
        if local.exists() or str(values["source"]).startswith((".", "/", "~")):
            values["source"] = str(local.resolve())
        values["revision"] = values.get("revision") or None
        specs.append(ModelSpec(**values))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: model names must be unique")
    default = str(data.get("default", names[0]))
    if default not in names:
        raise ValueError(f"{path}: default {default!r} is not a configured model")
    return ModelsConfig(
        tuple(specs),
        default,
        int(data.get("max_models", settings.max_models)),
        int(data.get("max_bytes_per_device", settings.max_model_bytes)),
    )
