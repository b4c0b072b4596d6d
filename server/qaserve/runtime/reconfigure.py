"""What a new models configuration changes: models added, removed and changed, and how a reconfigure reports it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qaserve.runtime.spec import ModelsConfig, ModelSpec


@dataclass(frozen=True)
class ReconfigurePlan:
    """Names of the models a new configuration adds, removes, and keeps with a changed spec, in configuration
    order."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]


def plan_reconfigure(current: Mapping[str, ModelSpec], config: ModelsConfig) -> ReconfigurePlan:
    """How `config` differs from the `current` specs by name; ValueError when its default is not among them."""
    new = {spec.name: spec for spec in config.models}
    if config.default not in new:
        raise ValueError(f"default model {config.default!r} is not among the configured models")
    return ReconfigurePlan(
        added=tuple(n for n in new if n not in current),
        removed=tuple(n for n in current if n not in new),
        changed=tuple(n for n in new if n in current and current[n] != new[n]),
    )


@dataclass(frozen=True)
class Reconfigured:
    """What a reconfigure changed: model names added, removed and reloaded (a spec changed), the default if it
    changed, and the changed models whose new version failed to load (their old version keeps serving)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    reloaded: tuple[str, ...] = ()
    default: str | None = None
    failed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.reloaded or self.default or self.failed)

    def describe(self) -> str:
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("reloaded", self.reloaded),
                ("kept the old version of", self.failed),
            )
            if names
        ]
        if self.default:
            parts.append(f"default now {self.default}")
        return "; ".join(parts) or "no changes"
