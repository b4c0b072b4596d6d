"""Test support: tiny random-weight QA models (real tokenizer, real architectures), server settings, servers in
this process or their own, waiting for them, and a fake replica. Tests, bench and the reliability harness use it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
import transformers
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from tokenizers import ByteLevelBPETokenizer, SentencePieceUnigramTokenizer
from transformers import AutoConfig, AutoModelForQuestionAnswering

from qaserve.config import EMBEDDED_MODEL, Settings

if TYPE_CHECKING:
    from qaserve.server import QAServer
    from qaserve.tracing import Tracing

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
    tokenizer = build_tokenizer(family)
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


def build_tokenizer(family: Family) -> Any:
    """A real fast tokenizer of the family's kind (see build_tiny_model), without a model."""
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


# What Optimum's `optimum-cli export onnx --task question-answering` writes (optimum-onnx does not install beside
# transformers 5, so the tests write its layout with the same exporter, torch.onnx): the checkpoint's config and
# tokenizer files, and model.onnx with Optimum's input, output and dynamic axis names at Optimum's default opset for
# these architectures; no qaserve manifest.
OPTIMUM_AXES = {0: "batch_size", 1: "sequence_length"}
OPTIMUM_OPSET = 14


def export_like_optimum(checkpoint: Path, out_dir: Path, onnx_file: str = "model.onnx") -> Path:
    """Writes `checkpoint` into `out_dir` as an Optimum ONNX export; `onnx_file` "onnx/model.onnx" gives the layout
    of hub repositories that keep the ONNX file beside the checkpoint (whose weights are then copied too)."""
    import shutil
    import warnings

    model = AutoModelForQuestionAnswering.from_pretrained(checkpoint, dtype=torch.float32).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in _tokenizer_inputs(checkpoint)]

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.model(**dict(zip(names, inputs, strict=True)))
            return output.start_logits, output.end_logits

    out_dir.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if onnx_file != "model.onnx" or not path.name.endswith(".safetensors"):
            shutil.copy2(path, out_dir / path.name)
    (out_dir / onnx_file).parent.mkdir(exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notice that it is the legacy one
        torch.onnx.export(
            Logits(),
            tuple(torch.ones((2, 16), dtype=torch.long) for _ in names),
            str(out_dir / onnx_file),
            input_names=names,
            output_names=["start_logits", "end_logits"],
            dynamic_axes={name: OPTIMUM_AXES for name in (*names, "start_logits", "end_logits")},
            opset_version=OPTIMUM_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return out_dir


def _tokenizer_inputs(checkpoint: Path) -> list[str]:
    return list(transformers.AutoTokenizer.from_pretrained(checkpoint).model_input_names)


def add_to_hub_cache(cache: Path, repo_id: str, files: Path, commit: str, ref: str = "main") -> Path:
    """Lays `files` (a directory) into the Hugging Face cache `cache` (HF_HUB_CACHE) as huggingface_hub lays out a
    download of repo_id at `commit`: blobs named by their etag (sha256 for large files, git's blob sha1 for the
    rest), snapshots/COMMIT/PATH as relative symlinks to them, and refs/REF holding the commit. Returns the
    snapshot directory."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        large = path.suffix in (".safetensors", ".onnx", ".bin")
        etag = hashlib.sha256(data).hexdigest() if large else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in an RPC error's google.rpc.Status details ("" where none)."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_settings(model_dir: Path, **overrides: object) -> Settings:
    """Settings for an in-process server on a free loopback port, metrics on a free port too, HTTP off."""
    values: dict[str, object] = {
        "model": str(model_dir),
        "model_name": "tiny",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": free_port(),
        "http_port": 0,
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
    piped, in this environment without the variables starting with `drop`, HTTP off, plus `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    environ["QASERVE_HTTP_PORT"] = "0"  # no fixed port: tests run side by side
    environ.update(env or {})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *launcher,
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )


# How long anything that should happen "soon" may take before a test calls it broken; only reached on failure.
PATIENCE = 5.0

ServerProcess = asyncio.subprocess.Process | subprocess.Popen[Any]


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], what: str, seconds: float = PATIENCE, every: float = 0.005
) -> None:
    """Waits until `condition()` (a bool, or a coroutine's) holds, checking every `every` seconds; AssertionError
    naming `what` after `seconds`."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + seconds
    while not await _holds(condition):
        assert loop.time() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(every)


async def _holds(condition: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = condition()
    return await result if inspect.isawaitable(result) else result


async def wait_serving(
    channel: grpc.aio.Channel,
    process: ServerProcess | None = None,
    seconds: float = 60.0,
    output: Callable[[], str] | None = None,
) -> None:
    """Waits until the server's overall health is SERVING. With the server's `process`, fails as soon as it exits;
    the failure quotes `output()` where given, else the process's piped stderr."""
    health = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + seconds
    while loop.time() < give_up:
        code = _exit_code(process)
        if code is not None:
            said = output() if output else await _stderr(process)
            raise AssertionError(f"the server exited with {code} before serving: {said}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server did not report SERVING within {seconds:.0f} s{': ' + output() if output else ''}")


def _exit_code(process: ServerProcess | None) -> int | None:
    if isinstance(process, asyncio.subprocess.Process):
        return process.returncode
    return None if process is None else process.poll()


async def _stderr(process: ServerProcess | None) -> str:
    if isinstance(process, asyncio.subprocess.Process) and process.stderr is not None:
        return repr(await process.stderr.read())
    return ""


@contextlib.asynccontextmanager
async def in_process_server(settings: Settings, tracing: Tracing | None = None) -> AsyncIterator[QAServer]:
    """A started qaserve in this process, its metrics on a fresh registry; stopped when the block ends. It listens
    on `server.port` (settings.port 0: a free one)."""
    from qaserve.server import create_server  # here: bench's load generator imports this module, not the server

    server, _ = create_server(settings, registry=CollectorRegistry(), tracing=tracing)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class FakeReplica:
    """A replica for the batcher and the model cache: runs one batch at a time on its own thread, answering with
    `outputs(windows)` (the windows themselves by default). It can be held mid-forward (every batch, or those
    `held_for` picks), slowed down by `delay` seconds, or made to fail where `fail_if` says."""

    def __init__(self, label: str = "fake-0") -> None:
        self.label = label
        self.device = f"fake:{label}"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=label)
        self.batches: list[list[Any]] = []
        self.delay = 0.0
        self.fail_if: Callable[[list[Any]], bool] = lambda _: False
        self.outputs: Callable[[list[Any]], list[Any]] = list
        self.held_for: Callable[[list[Any]], bool] = lambda _: True
        self._gate = threading.Event()
        self._gate.set()

    def forward(self, windows: list[Any]) -> list[Any]:
        self.batches.append(list(windows))
        if self.held_for(windows) and not self._gate.wait(PATIENCE):
            raise RuntimeError("the test never released the fake replica")
        if self.delay:
            time.sleep(self.delay)
        if self.fail_if(windows):
            raise RuntimeError("fake forward pass failed")
        return self.outputs(windows)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def seen(self) -> list[Any]:
        return [window for batch in self.batches for window in batch]

    def close(self) -> None:
        self.release()
        self.executor.shutdown()


# -- a test PKI ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here
    stranger_cert: Path  # a client certificate the other CA signed
    stranger_key: Path


class Authority:
    """A certificate authority of the tests: a self-signed CA that issues server and client certificates."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(self.name, self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, directory: Path, name: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = _builder(subject, self.name, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_pki(directory: Path) -> Pki:
    """A test CA with a server certificate (for localhost and 127.0.0.1) and a client certificate, and another CA
    with a client certificate of its own, written to `directory` as PEM files."""
    ca, other = Authority("qaserve test CA"), Authority("another CA")
    server_cert, server_key = ca.issue(directory, "server", server=True)
    client_cert, client_key = ca.issue(directory, "client", server=False)
    stranger_cert, stranger_key = other.issue(directory, "stranger", server=False)
    return Pki(
        ca=ca.write(directory / "ca.crt"),
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca=other.write(directory / "other-ca.crt"),
        stranger_cert=stranger_cert,
        stranger_key=stranger_key,
    )


@dataclass(frozen=True)
class HttpReply:
    """An HTTP response: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    url: str,
    body: object = None,
    *,
    method: str | None = None,
    headers: Mapping[str, str] | None = None,
    seconds: float = 30.0,
) -> HttpReply:
    """One HTTP request (urllib, on a thread, so an in-process server keeps serving). A body that is not bytes is
    sent as JSON (Content-Type application/json unless `headers` say otherwise). Error statuses are returned too."""
    sent = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=body, method=method, headers=sent)

    def call() -> HttpReply:
        try:
            with urllib.request.urlopen(request, timeout=seconds) as response:
                return HttpReply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
        except urllib.error.HTTPError as error:
            return HttpReply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())

    return await asyncio.to_thread(call)
