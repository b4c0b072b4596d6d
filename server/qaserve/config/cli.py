"""`qaserve serve`'s flags and the QASERVE_* environment, read into Settings: one flag per field."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

from qaserve import __version__
from qaserve.config.settings import ConfigError, Settings, env_name, flag_name, is_env_only
from qaserve.config.text import allowed_text, default_text, has_allowed, message, metavar


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
        allowed = f" ({allowed_text(field)})" if has_allowed(field) else ""
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=metavar(field),
            help=f"{field.description}{allowed} [{env_name(name)}; default {default_text(field)}]".replace("%", "%%"),
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
        raise ConfigError(message(where, first, Settings.model_fields.get(field))) from None
