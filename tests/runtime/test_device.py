"""Device and dtype resolution, and the same answers on a GPU when one is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qaserve.config import ModelSpec
from qaserve.qa import QAParams
from qaserve.runtime.device import default_batch_tokens, replica_devices, resolve_device, resolve_dtype
from qaserve.runtime.model import QAModel, WindowLogits

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_and_auto_without_accelerators() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        assert replica_devices("auto") == [torch.device("cpu")]


def test_dtypes_default_to_float32_on_cpu_and_half_on_gpu() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int8", torch.device("cpu"))


def test_batch_token_defaults_by_device() -> None:
    assert default_batch_tokens(torch.device("cpu")) < default_batch_tokens(torch.device("cuda", 0))


@pytest.mark.parametrize("spec", ["cuda", "cuda:7", "mps", "tpu"])
def test_unavailable_devices_are_refused(spec: str) -> None:
    if spec.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    if spec == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises((ValueError, RuntimeError)):
        replica_devices(spec)


@cuda
def test_cuda_replica_answers_like_cpu(tiny_model_dir: Path) -> None:
    cpu = QAModel.load(ModelSpec("cpu", str(tiny_model_dir), device="cpu"))
    gpu = QAModel.load(ModelSpec("gpu", str(tiny_model_dir), device="cuda", dtype="float32"))
    params = cpu.resolve(QAParams())
    windows = cpu.split("Where is the mill?", "The river flows into the lake near the old mill.", params)
    on_cpu: list[WindowLogits] = cpu.replicas[0].forward(QAModel.inputs(windows))
    on_gpu: list[WindowLogits] = gpu.replicas[0].forward(QAModel.inputs(windows))
    assert gpu.dtype is torch.float32 and str(gpu.replicas[0].device).startswith("cuda")
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert torch.allclose(a.start, b.start, atol=1e-4) and torch.allclose(a.end, b.end, atol=1e-4)
    cpu.close()
    gpu.close()
