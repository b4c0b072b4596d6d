"""The models file: the models a server may serve, each resolved once into a ModelSpec with concrete values."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.config import JsonDict
from pydantic_core import ErrorDetails

from qaserve.config.settings import BACKENDS_ALLOWED, DEVICES, Backend, ConfigError, Device, Dtype, Settings, flag_name
from qaserve.config.text import message
from qaserve.qa.types import MAX_TOP_K
from qaserve.qa.windowing import MIN_MAX_SEQ_LEN
from qaserve.runtime.spec import ModelsConfig, ModelSpec


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
    backend: Backend | None = Field(
        None, description="inference framework", json_schema_extra={**BACKENDS_ALLOWED, **_server("backend")}
    )
    device: Device | None = Field(
        None, description="device(s) of the replicas", json_schema_extra={**DEVICES, **_server("device")}
    )
    dtype: Dtype | None = Field(None, description="weights' dtype", json_schema_extra=_server("dtype"))
    replicas_per_device: int | None = Field(
        None, ge=0, description="forward threads per device; 0 = by the batching policy",
        json_schema_extra=_server("replicas_per_device"),
    )  # fmt: skip
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
            pinned=True,
            preload=True,
            **{key: getattr(settings, key) for key in INHERITED},
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


# ModelEntry keys that take the server's setting of the same name when unset: filled in here, once, so a ModelSpec
# holds what the model runs with.
INHERITED = (
    "backend",
    "device",
    "dtype",
    "replicas_per_device",
    "max_batch_windows",
    "max_batch_tokens",
    "max_wait_ms",
)


def _spec(entry: ModelEntry, path: Path, settings: Settings) -> ModelSpec:
    source = entry.source
    local = Path(source).expanduser()
    local = local if local.is_absolute() else path.parent / local
    if local.exists() or source.startswith((".", "/", "~")):
        source = str(local.resolve())
    # Every key of an entry is a ModelSpec field of the same name.
    inherited = {key: getattr(settings, key) for key in INHERITED if getattr(entry, key) is None}
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
        return f"{which}: {message(key, error, field)}"
    if loc[:1] == ("models",) and len(loc) == 1 and error["type"] == "list_type":
        return "models: must be [[models]] tables"
    key = str(loc[0]) if loc else ""
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r} (keys: {', '.join(ModelsFile.model_fields)})"
    if key == "models" and error["type"] in ("missing", "too_short"):
        return "no [[models]] configured"
    return message(key, error, ModelsFile.model_fields.get(key))
