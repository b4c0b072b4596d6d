"""Configured models by name: loads each once (off the event loop) and serves it through its batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qaserve.errors import ModelNotFound, ModelNotReady
from qaserve.metrics import Metrics
from qaserve.runtime.batcher import Batcher, BatchLimits
from qaserve.runtime.device import default_batch_tokens
from qaserve.runtime.model import ModelSpec, QAModel, WindowInput, WindowLogits

log = logging.getLogger(__name__)


@dataclass
class ServingModel:
    """A loaded model with the batcher that feeds its replicas."""

    model: QAModel
    batcher: Batcher[WindowInput, WindowLogits]


class ModelRegistry:
    """Only the models named in the server's configuration can be requested; clients never pass paths."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        default: str,
        limits: BatchLimits,
        metrics: Metrics | None = None,
        loader: Callable[[ModelSpec], QAModel] = QAModel.load,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        if default not in self.specs:
            raise ValueError(f"default model {default!r} is not among the configured models")
        self.default = default
        self._limits = limits
        self._metrics = metrics
        self._loader = loader
        self._loaded: dict[str, ServingModel] = {}
        self._loading: dict[str, asyncio.Task[ServingModel]] = {}

    def spec(self, name: str) -> ModelSpec:
        """The configured spec for `name` ("" = default); ModelNotFound otherwise."""
        spec = self.specs.get(name or self.default)
        if spec is None:
            raise ModelNotFound(name)
        return spec

    def loaded(self, name: str) -> ServingModel | None:
        return self._loaded.get(name or self.default)

    async def get(self, name: str) -> ServingModel:
        """The serving model for `name`, loading it on first use; concurrent first requests share one load."""
        spec = self.spec(name)
        serving = self._loaded.get(spec.name)
        if serving is not None:
            return serving
        task = self._loading.get(spec.name)
        if task is None:
            task = asyncio.create_task(self._load(spec), name=f"load-{spec.name}")
            self._loading[spec.name] = task
            task.add_done_callback(lambda _: self._loading.pop(spec.name, None))
        try:
            return await asyncio.shield(task)
        except ModelNotReady:
            raise
        except Exception as exc:
            raise ModelNotReady(f"model {spec.name!r} failed to load; see the server log") from exc

    async def _load(self, spec: ModelSpec) -> ServingModel:
        log.info("loading model %s from %s", spec.name, spec.source)
        model = await asyncio.to_thread(self._loader, spec)
        limits = self._limits
        if not limits.max_tokens:
            limits = dataclasses.replace(limits, max_tokens=default_batch_tokens(model.replicas[0].device))
        batcher: Batcher[WindowInput, WindowLogits] = Batcher(spec.name, model.replicas, limits, self._metrics)
        batcher.start()
        serving = ServingModel(model, batcher)
        self._loaded[spec.name] = serving
        return serving

    async def close(self) -> None:
        """Stops every batcher and frees the models."""
        for task in list(self._loading.values()):
            task.cancel()
        for serving in list(self._loaded.values()):
            await serving.batcher.stop()
            await asyncio.to_thread(serving.model.close)
        self._loaded.clear()
