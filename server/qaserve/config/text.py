"""Fields in words: what a setting or key allows and defaults to, and one-line messages from pydantic errors."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails


def message(where: str, error: ErrorDetails, field: FieldInfo | None) -> str:
    prefix = f"{where}: " if where else ""
    if error["type"] == "missing":
        return f"{prefix}required"
    if error["type"] == "value_error" or field is None:
        text = str(error.get("ctx", {}).get("error", error["msg"])) if error["type"] == "value_error" else error["msg"]
        return f"{prefix}{text}"
    return f"{prefix}{_input_text(error['input'])} is not allowed; expected {allowed_text(field)}"


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


def metavar(field: FieldInfo) -> str:
    choices = _choices(field)
    if choices:
        return "{" + ",".join(choices) + "}"
    if isinstance(field.json_schema_extra, dict) and "allowed" in field.json_schema_extra:
        return "{" + str(field.json_schema_extra["allowed"]).replace(" ", "") + "}"
    return {"int": "N", "number": "X", "bool": "BOOL", "str": "TEXT"}[_kind(field)]


def has_allowed(field: FieldInfo) -> bool:
    """Whether a field accepts less than any string."""
    extra = field.json_schema_extra
    return _kind(field) != "str" or bool(_choices(field)) or (isinstance(extra, dict) and "allowed" in extra)


def allowed_text(field: FieldInfo) -> str:
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


def default_text(field: FieldInfo) -> str:
    if isinstance(field.json_schema_extra, dict) and "default_text" in field.json_schema_extra:
        return str(field.json_schema_extra["default_text"])
    default = field.get_default()
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    return "unset" if default in ("", None) else str(default).lower() if isinstance(default, bool) else str(default)
