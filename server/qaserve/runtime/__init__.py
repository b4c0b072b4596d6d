"""Model runtime: backends, the model registry, the batcher and the request engine (no gRPC, no framework)."""

from qaserve.runtime.batcher import Batcher, BatchLimits
from qaserve.runtime.cache import ResponseCache
from qaserve.runtime.cache_entry import ModelInfo, ModelState
from qaserve.runtime.engine import QAEngine, build_engine
from qaserve.runtime.model import QAModel
from qaserve.runtime.registry import ModelRegistry

__all__ = [
    "BatchLimits",
    "Batcher",
    "ModelInfo",
    "ModelRegistry",
    "ModelState",
    "QAEngine",
    "QAModel",
    "ResponseCache",
    "build_engine",
]
