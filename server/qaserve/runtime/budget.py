"""The model cache's budget: how many models, and how many weight bytes per device, may be held at once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    """A model holding room in the cache: loaded, loading (its estimate), or closing after a reconfigure."""

    name: str
    devices: tuple[str, ...]
    nbytes: int  # per device
    evictable: bool = False  # loaded and not pinned: may be evicted to make room


@dataclass(frozen=True)
class Budget:
    """At most `max_models` models, and at most `max_bytes_per_device` weight bytes on each device (0: no byte
    limit). Pure: it judges the holdings it is given."""

    max_models: int
    max_bytes_per_device: int = 0

    def used(self, holdings: Iterable[Holding], device: str) -> int:
        """Weight bytes the holdings take on `device`."""
        return sum(h.nbytes for h in holdings if device in h.devices)

    def shortfall(self, holdings: Sequence[Holding], devices: Sequence[str], need: int) -> str:
        """What one more model of `need` bytes on `devices` would exceed beside `holdings` ("" when it fits)."""
        if len(holdings) >= self.max_models:
            return f"{self.max_models} models"
        limit = self.max_bytes_per_device
        if limit and any(self.used(holdings, d) + need > limit for d in devices):
            return f"{limit} bytes per device"
        return ""

    def fits(self, holdings: Sequence[Holding], devices: Sequence[str], need: int) -> bool:
        """Whether one more model of `need` bytes on `devices` fits beside `holdings`."""
        return not self.shortfall(holdings, devices, need)

    @staticmethod
    def victim(least_recent_first: Iterable[Holding]) -> str | None:
        """The model to evict first: the least recently used evictable one; None when none may go."""
        return next((h.name for h in least_recent_first if h.evictable), None)

    @staticmethod
    def usage(holdings: Iterable[Holding]) -> dict[str, tuple[int, int]]:
        """By device: (models, weight bytes) held there."""
        by_device: dict[str, tuple[int, int]] = {}
        for h in holdings:
            for device in h.devices:
                count, nbytes = by_device.get(device, (0, 0))
                by_device[device] = (count + 1, nbytes + h.nbytes)
        return by_device
