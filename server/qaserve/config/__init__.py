"""Server settings and the models file: typed, validated once at start, every bad value named in one line."""

from qaserve.config.cli import build_parser, parse_settings, settings_from
from qaserve.config.models_file import ModelEntry, ModelsFile, load_models_config, models_config
from qaserve.config.reference import markdown_tables
from qaserve.config.settings import (
    EMBEDDED_MODEL,
    ENV_PREFIX,
    ConfigError,
    Settings,
    env_name,
    flag_name,
    is_env_only,
)

__all__ = [
    "EMBEDDED_MODEL",
    "ENV_PREFIX",
    "ConfigError",
    "ModelEntry",
    "ModelsFile",
    "Settings",
    "build_parser",
    "env_name",
    "flag_name",
    "is_env_only",
    "load_models_config",
    "markdown_tables",
    "models_config",
    "parse_settings",
    "settings_from",
]
