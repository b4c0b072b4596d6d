"""Test support: tiny random-weight QA models (real tokenizer, real architectures) and server settings."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
import transformers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import ByteLevelBPETokenizer, SentencePieceUnigramTokenizer
from transformers import AutoConfig, AutoModelForQuestionAnswering

from qaserve.config import EMBEDDED_MODEL, Settings

SEED_QUESTION = "What is the capital of France?"
SEED_CONTEXT = "France is a country in Western Europe. Its capital is Paris."


@dataclass(frozen=True)
class Family:
    """An architecture the server is tested with: a tiny config of it and a real tokenizer of its kind."""

    model_type: str  # the transformers config's model_type
    tokenizer: str  # the transformers tokenizer class
    kind: str  # WordPiece | byte-level BPE | Unigram: how its tokenizer splits words
    token_type_ids: bool  # whether its tokenizer (and so the exported model) takes token_type_ids
    sizes: Mapping[str, Any]  # config fields that make it tiny
    specials: tuple[str, ...] = ()  # a trained tokenizer's special tokens, numbered as the family's checkpoints do


TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_DISTILBERT = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
ALBERT_SPECIALS = ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
DEBERTA_SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")
DEBERTA_SIZES = {**TINY, "type_vocab_size": 0, "relative_attention": True, "position_buckets": 64}
FAMILIES = {
    family.model_type: family
    for family in (
        Family("bert", "BertTokenizer", "WordPiece", True, TINY),
        Family("distilbert", "DistilBertTokenizer", "WordPiece", False, TINY_DISTILBERT),
        Family("electra", "ElectraTokenizer", "WordPiece", True, {**TINY, "embedding_size": 16}),
        Family(
            "roberta", "RobertaTokenizer", "byte-level BPE", False, {**TINY, "type_vocab_size": 1}, ROBERTA_SPECIALS
        ),
        Family(
            "xlm-roberta", "XLMRobertaTokenizer", "Unigram", False, {**TINY, "type_vocab_size": 1}, ROBERTA_SPECIALS
        ),
        Family("albert", "AlbertTokenizer", "Unigram", False, {**TINY, "embedding_size": 16}, ALBERT_SPECIALS),
        Family("deberta-v2", "DebertaV2Tokenizer", "Unigram", True, DEBERTA_SIZES, DEBERTA_SPECIALS),
    )
}
# What the byte-level BPE and Unigram tokenizers are trained on: the test texts' words, accented letters and CJK
# characters among them (as written and lower-cased, for the families whose tokenizers lower-case), so that words
# split into several pieces and pieces hold multi-byte characters.
TOKENIZER_TEXTS = (
    SEED_QUESTION,
    SEED_CONTEXT,
    "The river flows into the lake near the old mill. The mill was built in 1820 by the miller's family.",
    "Der Fluss fließt durch Zürich; São Paulo liegt in Brasilien, 東京 in Japan. Ein Café für naïve Gäste.",
    "Where does the river flow? Who built the mill, and when? Which city is the largest?",
)
TOKENIZER_CORPUS = TOKENIZER_TEXTS + tuple(text.lower() for text in TOKENIZER_TEXTS)
MAX_LENGTH = 512  # tokens, as the families' checkpoints have it


def build_tiny_model(directory: Path, architecture: str = "bert", seed: int = 0) -> Path:
    """Saves a 2-layer random-weight QA model of a family in FAMILIES, with a real tokenizer of its kind, into
    `directory`: the embedded model's WordPiece vocabulary, or a byte-level BPE or Unigram (SentencePiece) model
    trained on TOKENIZER_CORPUS with the tokenizers library."""
    family = FAMILIES[architecture]
    tokenizer = _tokenizer(family)
    # RoBERTa-style position ids start after the padding index, so their checkpoints have 2 more positions.
    extra_positions = 2 if family.specials == ROBERTA_SPECIALS else 0
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH + extra_positions,
        pad_token_id=tokenizer.pad_token_id,
        **family.sizes,
    )
    torch.manual_seed(seed)
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _tokenizer(family: Family) -> Any:
    cls = getattr(transformers, family.tokenizer)
    if family.kind == "WordPiece":
        words = (EMBEDDED_MODEL / "vocab.txt").read_text(encoding="utf-8").splitlines()
        return cls(vocab={word: i for i, word in enumerate(words)}, model_max_length=MAX_LENGTH)
    if family.kind == "byte-level BPE":
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            TOKENIZER_CORPUS, vocab_size=400, special_tokens=list(family.specials), show_progress=False
        )
        merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
        return cls(vocab=bpe.get_vocab(), merges=merges, model_max_length=MAX_LENGTH)
    unknown = next(token for token in family.specials if "unk" in token.lower())
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        TOKENIZER_CORPUS, vocab_size=400, special_tokens=list(family.specials), unk_token=unknown, show_progress=False
    )
    pieces = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return cls(vocab=pieces, unk_token=unknown, model_max_length=MAX_LENGTH)


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
