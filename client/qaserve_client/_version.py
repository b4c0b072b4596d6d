"""The installed qaserve-client version."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("qaserve-client")
except metadata.PackageNotFoundError:
    # Imported from a source tree that was never installed.
    __version__ = "0+unknown"
