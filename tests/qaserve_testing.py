"""Test support: tiny random-weight QA models (real tokenizer, real architectures) and server settings."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
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
