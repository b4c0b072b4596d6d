"""ModelService types and calls shared by QAClient and AsyncQAClient."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from qaserve_client.v1 import model_service_pb2 as pb

# Loading weights can take far longer than an answer: LoadModel gets this deadline unless the caller gives one.
LOAD_TIMEOUT = 300.0

_STATES = {
    pb.MODEL_STATE_UNLOADED: "unloaded",
    pb.MODEL_STATE_LOADING: "loading",
    pb.MODEL_STATE_READY: "ready",
    pb.MODEL_STATE_FAILED: "failed",
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the server is configured with: state is unloaded, loading, ready or failed."""

    name: str
    state: str
    is_default: bool
    pinned: bool
    devices: tuple[str, ...]
    dtype: str
    bytes: int
    revision: str
    last_used: datetime | None
    error: str

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["devices"] = list(self.devices)
        data["last_used"] = self.last_used.isoformat() if self.last_used else None
        return data


def model_info(message: pb.Model) -> ModelInfo:
    """Model -> ModelInfo."""
    last_used = None
    if message.HasField("last_used_time"):
        last_used = datetime.fromtimestamp(message.last_used_time.ToNanoseconds() / 1e9, tz=UTC)
    return ModelInfo(
        name=message.name,
        state=_STATES.get(message.state, "unspecified"),
        is_default=message.is_default,
        pinned=message.pinned,
        devices=tuple(message.devices),
        dtype=message.dtype,
        bytes=message.bytes,
        revision=message.revision,
        last_used=last_used,
        error=message.error,
    )
