"""The reference tables (docs/configuration.md) of settings and models-file keys, made from the fields."""

from __future__ import annotations

from qaserve.config.models_file import ModelEntry, ModelsFile
from qaserve.config.settings import Settings, env_name, flag_name, is_env_only
from qaserve.config.text import allowed_text, default_text, has_allowed


def markdown_tables() -> str:
    """docs/configuration.md's tables of settings and models-file keys, from the fields (a test keeps them equal)."""
    rows = ["| flag | default | allowed | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        allowed = allowed_text(field) if has_allowed(field) else ""
        shown = f"`{env_name(name)}` (environment only)" if is_env_only(field) else f"`{flag_name(name)}`"
        rows.append(f"| {shown} | {default_text(field)} | {allowed} | {field.description} |")
    rows += ["", "| models file key | default | allowed | meaning |", "|---|---|---|---|"]
    for model in (ModelsFile, ModelEntry):
        for name, field in model.model_fields.items():
            if name == "models":
                continue
            key = f"`[[models]]` `{name}`" if model is ModelEntry else f"`{name}`"
            default = "required" if field.is_required() else default_text(field)
            allowed = allowed_text(field) if has_allowed(field) else ""
            rows.append(f"| {key} | {default} | {allowed} | {field.description} |")
    return "\n".join(rows) + "\n"
