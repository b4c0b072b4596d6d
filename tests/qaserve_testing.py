"""Test support: tiny random-weight QA models (real tokenizer, real architectures) and server settings."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
)

from qaserve.config import EMBEDDED_MODEL, Settings

SEED_QUESTION = "What is the capital of France?"
SEED_CONTEXT = "France is a country in Western Europe. Its capital is Paris."


def build_tiny_model(directory: Path, architecture: str = "bert", seed: int = 0) -> Path:
    """Saves a 2-layer random-weight QA model with the embedded model's WordPiece tokenizer into `directory`."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    common = {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": 512, "pad_token_id": 0}
    if architecture == "bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **common)
        model: torch.nn.Module = BertForQuestionAnswering(config)
    elif architecture == "distilbert":
        config = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **common)
        model = DistilBertForQuestionAnswering(config)
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    else:
        raise ValueError(architecture)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def export_tiny_onnx(model_dir: Path, out_dir: Path, quantize: str = "none") -> Path:
    """`qaserve export` of a tiny model into `out_dir` (tokenizer, config.json, model.onnx, manifest)."""
    from qaserve.export import export

    export(str(model_dir), out_dir, quantize=quantize)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_settings(model_dir: Path, **overrides: object) -> Settings:
    """Settings for an in-process server on a free loopback port, metrics on a free port too."""
    values: dict[str, object] = {
        "model": str(model_dir),
        "model_name": "tiny",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": free_port(),
        "device": "cpu",
        "grace_seconds": 2.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def start_qaserve(
    *args: str,
    launcher: Sequence[str] = ("-m", "qaserve.main"),
    env: Mapping[str, str] | None = None,
    drop: tuple[str, ...] = ("QASERVE_",),
) -> asyncio.subprocess.Process:
    """A `qaserve` process of its own (`args` follow the command: "serve", flags...), stdout discarded and stderr
    piped, in this environment without the variables starting with `drop`, plus `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    environ.update(env or {})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *launcher,
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )


async def wait_serving(channel: grpc.aio.Channel, process: asyncio.subprocess.Process, seconds: float = 60.0) -> None:
    """Waits until the process's overall health is SERVING; fails, with its stderr, if it exits first."""
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(int(seconds / 0.1)):
        if process.returncode is not None:
            stderr = await process.stderr.read() if process.stderr is not None else b""
            raise AssertionError(f"the server exited with {process.returncode} before serving: {stderr!r}")
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server did not report SERVING within {seconds:.0f} s")
