"""Server settings: one object, built once in main from flags and QASERVE_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# The embedded default model ships in the repository (and the image) next to the server package.
EMBEDDED_MODEL = Path(__file__).resolve().parents[2] / "models" / "minilm-l6-squadshifts"


@dataclass(frozen=True)
class Settings:
    """Everything configurable; flags win over QASERVE_<NAME> environment variables, which win over defaults."""

    model: str = str(EMBEDDED_MODEL)
    model_name: str = ""  # "" = the model directory's name (or the hub id's last part)
    revision: str = ""
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    device: str = "auto"
    dtype: str = "auto"
    max_context_chars: int = 100_000
    max_in_flight: int = 1024
    max_batch_windows: int = 32
    max_batch_tokens: int = 0  # 0 = by device: 1024 on CPU, 65536 on GPU
    max_wait_ms: float = 2.0
    replicas_per_device: int = 1
    torch_threads: int = 0  # 0 = all cores
    tokenize_threads: int = 2
    stream_max_in_flight: int = 64
    grace_seconds: float = 10.0
    log_level: str = "INFO"

    @property
    def resolved_model_name(self) -> str:
        return self.model_name or Path(self.model.rstrip("/")).name

    def describe(self) -> str:
        """The resolved settings for the start-up log."""
        return " ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


HELP = {
    "model": "model directory or hub id to serve (default: the embedded model)",
    "model_name": "name clients use for the model (default: the directory name)",
    "revision": "hub revision (branch, tag or commit) when --model is a hub id",
    "host": "address to bind the gRPC server to",
    "port": "gRPC port (0 picks a free one)",
    "metrics_port": "Prometheus /metrics HTTP port (0 disables it)",
    "device": "auto|cpu|cuda|cuda:N|mps; auto picks cuda, then mps, then cpu; cuda uses every visible GPU",
    "dtype": "auto|float32|float16|bfloat16; auto is float16 on GPU, float32 on CPU",
    "max_context_chars": "longest context accepted, in characters",
    "max_in_flight": "requests admitted at once; more get RESOURCE_EXHAUSTED with a retry delay",
    "max_batch_windows": "most windows in one forward pass (1 turns batching off)",
    "max_batch_tokens": "most padded tokens (windows x longest) per forward pass; 0 = 1024 on CPU, 65536 on GPU",
    "max_wait_ms": "longest a free replica waits for windows of requests still being tokenized",
    "replicas_per_device": "model replicas (forward threads) per device",
    "torch_threads": "torch intra-op threads (0 = all cores)",
    "tokenize_threads": "threads for tokenizing and decoding",
    "stream_max_in_flight": "AnswerMany items of one stream in progress at once (flow control)",
    "grace_seconds": "on SIGTERM/SIGINT, how long in-flight requests get to finish",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Settings:
    """Builds Settings from `qaserve serve` flags and QASERVE_* variables."""
    parser = argparse.ArgumentParser(prog="qaserve serve", description="Serve extractive question answering over gRPC.")
    defaults = Settings()
    for field in dataclasses.fields(Settings):
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
    settings = Settings(**vars(args))
    _check(settings, parser)
    return settings


def _check(s: Settings, parser: argparse.ArgumentParser) -> None:
    positive = (
        "max_context_chars",
        "max_in_flight",
        "max_batch_windows",
        "stream_max_in_flight",
        "replicas_per_device",
    )
    for name in positive:
        if getattr(s, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("port", "metrics_port", "torch_threads", "max_wait_ms", "grace_seconds", "max_batch_tokens"):
        if getattr(s, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if s.tokenize_threads < 1:
        parser.error("--tokenize-threads must be at least 1")
