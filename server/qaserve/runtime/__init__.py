"""Model runtime: devices, loading, the model registry, the batcher and the request engine (no gRPC)."""

from qaserve.runtime.batcher import Batcher, BatchLimits
from qaserve.runtime.engine import QAEngine
from qaserve.runtime.model import ModelSpec, QAModel
from qaserve.runtime.registry import ModelRegistry

__all__ = ["BatchLimits", "Batcher", "ModelRegistry", "ModelSpec", "QAEngine", "QAModel"]
