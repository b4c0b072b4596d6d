"""Model runtime: backends, the model registry, the batcher and the request engine (no gRPC, no framework)."""

from qaserve.runtime.batcher import Batcher, BatchLimits
from qaserve.runtime.cache import ResponseCache
from qaserve.runtime.engine import QAEngine
from qaserve.runtime.model import QAModel
from qaserve.runtime.registry import ModelInfo, ModelRegistry, ModelState

__all__ = ["BatchLimits", "Batcher", "ModelInfo", "ModelRegistry", "ModelState", "QAEngine", "QAModel", "ResponseCache"]
