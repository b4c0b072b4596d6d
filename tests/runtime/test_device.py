"""Device and dtype resolution, thread sizing, and the same answers on a GPU when one is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qaserve.qa import QAParams
from qaserve.runtime.backends import WindowLogits, threads_per_replica
from qaserve.runtime.backends.torch import replica_devices, resolve_device, resolve_dtype
from qaserve.runtime.device import accelerator_possible, cpu_cores, default_batch_tokens
from qaserve.runtime.model import QAModel, load_model
from qaserve.runtime.spec import ModelSpec

ACCELERATOR = torch.cuda.is_available() or torch.backends.mps.is_available()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
accelerator = pytest.mark.skipif(not ACCELERATOR, reason="needs a CUDA or MPS GPU")
cpu_only = pytest.mark.skipif(ACCELERATOR, reason="this machine has a GPU")


def test_cpu_is_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert replica_devices("cpu") == [torch.device("cpu")]


@cpu_only
def test_auto_is_the_cpu_without_accelerators() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert replica_devices("auto") == [torch.device("cpu")]


@accelerator
def test_accelerator_check_never_misses_one_torch_sees() -> None:
    assert accelerator_possible()


def test_dtypes_default_to_float32_on_cpu_and_half_on_gpu() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int8", torch.device("cpu"))


def test_batch_token_defaults_by_device() -> None:
    assert default_batch_tokens("cpu") < default_batch_tokens("cuda:0")


def test_replicas_split_the_cores_unless_told() -> None:
    cores = cpu_cores()
    assert threads_per_replica(0, 1, "cpu") == cores
    assert threads_per_replica(0, cores * 2, "cpu") == 1
    assert threads_per_replica(0, 2, "cpu") == max(1, cores // 2)
    assert threads_per_replica(0, 1, "cuda:0") == 1
    assert threads_per_replica(3, 4, "cpu") == 3


@pytest.mark.parametrize("spec", ["cuda", "cuda:7", "mps", "tpu"])
def test_unavailable_devices_are_refused(spec: str) -> None:
    if spec.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    if spec == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ValueError):
        replica_devices(spec)


@cuda
def test_cuda_replica_answers_like_cpu(tiny_model_dir: Path) -> None:
    cpu = load_model(ModelSpec("cpu", str(tiny_model_dir), backend="torch", device="cpu"))
    gpu = load_model(ModelSpec("gpu", str(tiny_model_dir), backend="torch", device="cuda", dtype="float32"))
    params = cpu.resolve(QAParams())
    windows = cpu.split("Where is the mill?", "The river flows into the lake near the old mill.", params)
    on_cpu: list[WindowLogits] = cpu.replicas[0].forward(QAModel.inputs(windows))
    on_gpu: list[WindowLogits] = gpu.replicas[0].forward(QAModel.inputs(windows))
    assert gpu.dtype == "float32" and gpu.devices[0].startswith("cuda")
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert np.allclose(a.start, b.start, atol=1e-4) and np.allclose(a.end, b.end, atol=1e-4)
    cpu.close()
    gpu.close()
