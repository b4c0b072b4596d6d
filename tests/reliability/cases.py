"""Bad input (each request gets its documented status and the server keeps serving) and faults (each fails only
the requests it touches, and the next request succeeds)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from qaserve.qa import QAParams
from qaserve_client.v1 import model_service_pb2 as mpb
from qaserve_client.v1 import model_service_pb2_grpc as mpb_grpc
from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from .harness import (
    MODEL,
    PROBE,
    SHORT_CONTEXT,
    InProcessServer,
    Row,
    Server,
    describe_error,
    describe_status,
    probe,
)

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
SERVICE = "/qaserve.v1.QuestionAnsweringService"
QUESTION = "What is the capital of France?"
# gRPC's code for a request that does not parse, with a generic message (the parser's text stays in the log).
MALFORMED = "INTERNAL MALFORMED_REQUEST"


@dataclass
class Context:
    """What a case may use: the server, a channel to it, and the directory of the model it serves."""

    server: Server
    channel: grpc.aio.Channel
    model_dir: Path
    max_context_chars: int = 100_000

    @property
    def stub(self) -> pb_grpc.QuestionAnsweringServiceStub:
        return pb_grpc.QuestionAnsweringServiceStub(self.channel)


Send = Callable[[Context], Awaitable[str]]


@dataclass(frozen=True)
class Case:
    name: str
    expected: str
    send: Send
    bug: str = ""


# -- ways to send ---------------------------------------------------------------------------------------------------


def answer(**fields: Any) -> Send:
    """An Answer call: "OK" or the status it got."""

    async def send(ctx: Context) -> str:
        values = {"question": QUESTION, "context": SHORT_CONTEXT, **fields}
        for key, value in values.items():
            if callable(value):
                values[key] = value(ctx)
        try:
            response = await ctx.stub.Answer(pb.AnswerRequest(**values), timeout=30)
        except grpc.aio.AioRpcError as error:
            return describe_error(error)
        return "OK" if response.answers else "OK without answers"

    return send


def raw(method: str, payload: bytes, streaming: bool = False) -> Send:
    """Bytes sent as the request message of `method`, with no serializer: what a buggy or hostile client sends."""

    async def send(ctx: Context) -> str:
        try:
            if streaming:
                call = ctx.channel.unary_stream(f"{SERVICE}/{method}")(payload, timeout=10)
                async for _ in call:
                    pass
            else:
                await ctx.channel.unary_unary(f"{SERVICE}/{method}")(payload, timeout=10)
        except grpc.aio.AioRpcError as error:
            return with_leak(error)
        return "OK"

    return send


def with_leak(error: grpc.aio.AioRpcError) -> str:
    """The status, noting a message that exposes server internals (exception types, tracebacks)."""
    details = error.details() or ""
    leaked = next((word for word in ("DecodeError", "Traceback", "<class") if word in details), "")
    return describe_error(error) + (f" (message leaks {leaked!r})" if leaked else "")


def many_with_malformed_item(timeout: float = 3.0) -> Send:
    """An AnswerMany stream whose second frame does not parse."""

    async def send(ctx: Context) -> str:
        good = pb.AnswerManyRequest(id="1", request=PROBE).SerializeToString()
        started = time.monotonic()
        call = ctx.channel.stream_stream(f"{SERVICE}/AnswerMany")(iter([good, b"\xff\xff\xff", good]), timeout=timeout)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"DEADLINE_EXCEEDED: the stream hung until the client's {timeout:.0f} s deadline"
            elapsed = time.monotonic() - started
            return with_leak(error) + (", promptly" if elapsed < timeout / 2 else f" after {elapsed:.1f} s")
        return "OK"

    return send


def many_with_bad_item() -> Send:
    """An AnswerMany stream of good items and one out-of-range item: that item's own status; the rest answered."""

    async def send(ctx: Context) -> str:
        items = [pb.AnswerManyRequest(id=str(i), request=PROBE) for i in range(10)]
        bad = pb.AnswerRequest()
        bad.CopyFrom(PROBE)
        bad.top_k = 0
        items[5] = pb.AnswerManyRequest(id="bad", request=bad)
        responses = {r.id: r async for r in ctx.stub.AnswerMany(iter(items), timeout=30)}
        answered = sum(r.HasField("response") for r in responses.values())
        item = responses["bad"]
        status = describe_status(item.error.code, item.error) if item.HasField("error") else "OK"
        return f"item: {status}; {answered} of 9 others answered"

    return send


def progressive(request: pb.AnswerProgressiveRequest) -> Send:
    async def send(ctx: Context) -> str:
        try:
            async for _ in ctx.stub.AnswerProgressive(request, timeout=30):
                pass
        except grpc.aio.AioRpcError as error:
            return describe_error(error)
        return "OK"

    return send


def tcp(payload: bytes) -> Send:
    """Bytes straight onto the gRPC port, not HTTP/2: the server must close that connection, and only that one."""

    async def send(ctx: Context) -> str:
        host, port = ctx.server.target.rsplit(":", 1)

        def exchange() -> str:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(payload)
                try:
                    while s.recv(65536):
                        pass
                except TimeoutError:
                    return "connection left open"
            return "connection closed"

        return await asyncio.to_thread(exchange)

    return send


def message(**fields: Any) -> bytes:
    return pb.AnswerRequest(question=QUESTION, context=SHORT_CONTEXT, **fields).SerializeToString()


# -- the bad input table --------------------------------------------------------------------------------------------

INVALID = "INVALID_ARGUMENT field "
NOT_FOUND = "NOT_FOUND MODEL_NOT_FOUND"
BAD_INPUT: tuple[Case, ...] = (
    Case("question empty", INVALID + "question", answer(question="")),
    Case("question whitespace only (incl. U+3000)", INVALID + "question", answer(question=" \t\n\u3000 ")),
    Case("context empty", INVALID + "context", answer(context="")),
    Case("context whitespace only", INVALID + "context", answer(context="\n\n   \t")),
    Case(
        "context one character over --max-context-chars",
        INVALID + "context",
        answer(context=lambda ctx: "a" * (ctx.max_context_chars + 1)),
    ),
    Case("question of 10,000 words", INVALID + "question", answer(question="where " * 10_000)),
    Case("top_k 0", INVALID + "top_k", answer(top_k=0)),
    Case("top_k -1", INVALID + "top_k", answer(top_k=-1)),
    Case("top_k 21", INVALID + "top_k", answer(top_k=21)),
    Case("top_k INT32_MAX", INVALID + "top_k", answer(top_k=INT32_MAX)),
    Case("top_k INT32_MIN", INVALID + "top_k", answer(top_k=INT32_MIN)),
    Case("max_answer_len 0", INVALID + "max_answer_len", answer(max_answer_len=0)),
    Case("max_answer_len INT32_MIN", INVALID + "max_answer_len", answer(max_answer_len=INT32_MIN)),
    Case("max_answer_len INT32_MAX (no upper bound)", "OK", answer(max_answer_len=INT32_MAX)),
    Case("max_seq_len 15", INVALID + "max_seq_len", answer(max_seq_len=15)),
    Case("max_seq_len -1", INVALID + "max_seq_len", answer(max_seq_len=-1)),
    Case("max_seq_len INT32_MAX", INVALID + "max_seq_len", answer(max_seq_len=INT32_MAX)),
    Case("doc_stride -1", INVALID + "doc_stride", answer(doc_stride=-1)),
    Case("doc_stride INT32_MAX", INVALID + "doc_stride", answer(doc_stride=INT32_MAX)),
    Case(
        "doc_stride above a window's context room", INVALID + "doc_stride", answer(max_seq_len=16, doc_stride=10)
    ),  # 13 context tokens, room for 6: several windows
    Case("max_question_len 0", INVALID + "max_question_len", answer(max_question_len=0)),
    Case("max_question_len INT32_MIN", INVALID + "max_question_len", answer(max_question_len=INT32_MIN)),
    Case("max_question_len INT32_MAX (docs/api.md: >= 1)", "OK", answer(max_question_len=INT32_MAX)),
    Case("model: unknown name", NOT_FOUND, answer(model="nope")),
    Case("model: configured name in other case", NOT_FOUND, answer(model=MODEL.upper())),
    Case("model: /etc/passwd", NOT_FOUND, answer(model="/etc/passwd")),
    Case("model: relative path", NOT_FOUND, answer(model="../models/minilm-l6-squadshifts")),
    Case("model: the served model's own directory", NOT_FOUND, answer(model=lambda ctx: str(ctx.model_dir))),
    Case("model: hub id", NOT_FOUND, answer(model="distilbert/distilbert-base-cased-distilled-squad")),
    Case("model: hub id with revision", NOT_FOUND, answer(model="deepset/roberta-base-squad2@main")),
    Case("model: name + NUL byte", NOT_FOUND, answer(model=MODEL + "\x00")),
    Case(
        "unknown field number 99 (AnswerRequest has no enum fields)",
        "OK",
        raw("Answer", message() + b"\x98\x06\x07"),
    ),
    Case("bool field sent as varint 7", "OK", raw("Answer", message() + b"\x48\x07")),
    Case("wire: random bytes", MALFORMED, raw("Answer", bytes(range(255, 0, -3)))),
    Case("wire: truncated message", MALFORMED, raw("Answer", message()[:-7])),
    Case("wire: invalid UTF-8 in question", MALFORMED, raw("Answer", b"\x0a\x02\xc3\x28")),
    Case(
        "wire: random bytes to AnswerProgressive",
        MALFORMED,
        raw("AnswerProgressive", b"\x0a\xff\xff\xff\xff\xff", streaming=True),
    ),
    Case("wire: a malformed AnswerMany item", MALFORMED + ", promptly", many_with_malformed_item()),
    Case("oversized message (5 MiB > 4 MiB limit)", "RESOURCE_EXHAUSTED", answer(context="x " * (5 << 19))),
    Case("unknown method", "UNIMPLEMENTED", raw("Ask", message())),
    Case("AnswerProgressive without a request", INVALID + "question", progressive(pb.AnswerProgressiveRequest())),
    Case(
        "AnswerMany: one out-of-range item among good ones",
        "item: " + INVALID + "top_k; 9 of 9 others answered",
        many_with_bad_item(),
    ),
    Case(
        "not HTTP/2: an HTTP/1.1 request on the port",
        "connection closed",
        tcp(b"GET /metrics HTTP/1.1\r\nHost: qaserve\r\n\r\n"),
    ),
    Case("not HTTP/2: random bytes on the port", "connection closed", tcp(bytes(range(256)) * 16)),
)


async def bad_input(ctx: Context, case: Case) -> Row:
    """Runs one case, then checks the server still answers."""
    try:
        observed = await case.send(ctx)
    except Exception as error:  # a case that breaks the client side is a failed row, not a crashed suite
        observed = f"client error {type(error).__name__}: {error}"
    after = await probe(ctx.stub)
    return Row(
        f"bad input: {case.name}",
        case.expected,
        f"{observed}; next request {after}",
        observed == case.expected and after == "ok",
        case.bug,
    )


# -- faults (in-process server: models tiny (pinned), spare and gone (unpinned, loaded on first use)) ------------

# Settings of the fault server: small batches, so a failing forward pass has few bystanders to take with it, on one
# replica per model, so that a fault injected into it meets every request.
FAULT_SERVER_SETTINGS: dict[str, Any] = {"max_batch_windows": 4, "replicas_per_device": 1}


@dataclass
class FaultContext(Context):
    model_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def models(self) -> mpb_grpc.ModelServiceStub:
        return mpb_grpc.ModelServiceStub(self.channel)

    @property
    def qa_server(self) -> Any:
        assert isinstance(self.server, InProcessServer)
        return self.server.qa_server


async def call(stub: pb_grpc.QuestionAnsweringServiceStub, request: pb.AnswerRequest) -> tuple[str, str]:
    """(status, message) of one Answer call."""
    try:
        await stub.Answer(request, timeout=30)
    except grpc.aio.AioRpcError as error:
        return describe_error(error), error.details() or ""
    return "OK", ""


async def with_bystanders(ctx: FaultContext, request: pb.AnswerRequest, bystanders: int = 8) -> tuple[str, str, str]:
    """The faulty request alongside requests to the default model: (its status, its message, bystanders' statuses)."""
    results = await asyncio.gather(call(ctx.stub, request), *(call(ctx.stub, PROBE) for _ in range(bystanders)))
    (status, text), others = results[0], collections.Counter(s for s, _ in results[1:])
    return status, text, ", ".join(f"{n} {s}" for s, n in others.items())


def leaks_paths(text: str, ctx: FaultContext) -> bool:
    return any(str(d) in text for d in ctx.model_dirs.values())


async def corrupted_before_load(ctx: FaultContext) -> tuple[str, str, bool]:
    weights = ctx.model_dirs["spare"] / "model.safetensors"
    weights.write_bytes(b"\x00" * 8 + b"this is not a safetensors file" * 100)
    status, text, others = await with_bystanders(
        ctx, pb.AnswerRequest(question=QUESTION, context=SHORT_CONTEXT, model="spare")
    )
    observed = f"spare: {status} ({text[:60]}...); default model: {others}"
    expected = "FAILED_PRECONDITION MODEL_LOAD_FAILED"
    clear = "failed to load" in text and not leaks_paths(text, ctx)
    return observed, expected, status == expected and clear and others == "8 OK"


async def removed_before_load(ctx: FaultContext) -> tuple[str, str, bool]:
    shutil.rmtree(ctx.model_dirs["gone"])
    status, text, others = await with_bystanders(
        ctx, pb.AnswerRequest(question=QUESTION, context=SHORT_CONTEXT, model="gone")
    )
    observed = f"gone: {status} ({text}); default model: {others}"
    says_missing = any(words in text.lower() for words in ("not found", "no such", "does not exist", "missing"))
    clear = "failed to load" in text and says_missing and not leaks_paths(text, ctx)
    passed = status == "FAILED_PRECONDITION MODEL_LOAD_FAILED" and clear and others == "8 OK"
    return observed, "FAILED_PRECONDITION MODEL_LOAD_FAILED saying the directory is missing", passed


async def restored_and_reloaded(ctx: FaultContext) -> tuple[str, str, bool]:
    spare = pb.AnswerRequest(question=QUESTION, context=SHORT_CONTEXT, model="spare")
    state = (await ctx.models.GetModel(mpb.GetModelRequest(name="spare"), timeout=10)).model.state
    if state != mpb.MODEL_STATE_FAILED:  # run alone: break it first
        (ctx.model_dirs["spare"] / "model.safetensors").write_bytes(b"\x00" * 64)
        await call(ctx.stub, spare)
    shutil.copy(ctx.model_dir / "model.safetensors", ctx.model_dirs["spare"] / "model.safetensors")
    before, _ = await call(ctx.stub, spare)  # a failed model stays failed until LoadModel retries it
    loaded = await ctx.models.LoadModel(mpb.LoadModelRequest(name="spare"), timeout=60)
    after, _ = await call(ctx.stub, spare)
    state_name = mpb.ModelState.Name(loaded.model.state)
    observed = f"before LoadModel: {before}; LoadModel: {state_name}; after: {after}"
    passed = before == "FAILED_PRECONDITION MODEL_LOAD_FAILED" and state_name == "MODEL_STATE_READY" and after == "OK"
    return observed, "FAILED_PRECONDITION until LoadModel, then READY and OK", passed


async def loaded_model_dir_removed(ctx: FaultContext) -> tuple[str, str, bool]:
    shutil.rmtree(ctx.model_dirs[MODEL])
    statuses = collections.Counter([(await call(ctx.stub, PROBE))[0] for _ in range(5)])
    observed = ", ".join(f"{n} {s}" for s, n in statuses.items())
    return observed, "OK (the weights are in memory)", statuses == {"OK": 5}


@contextlib.contextmanager
def patched_forward(replica: Any, forward: Callable[[list[Any]], list[Any]]) -> Iterator[None]:
    """The batcher calls replica.forward for each batch: this one, for the duration of the block."""
    replica.forward = forward
    try:
        yield
    finally:
        del replica.forward  # the class's method again


async def forward_raises_once(ctx: FaultContext) -> tuple[str, str, bool]:
    replica = ctx.qa_server.engine.registry.loaded(MODEL).model.replicas[0]
    real, calls = replica.forward, 0

    def broken(windows: list[Any]) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real(windows)

    with patched_forward(replica, broken):
        status, text = await call(ctx.stub, PROBE)
    observed = f"{status} ({text})"
    return observed, "INTERNAL INFERENCE_FAILED", status == "INTERNAL INFERENCE_FAILED" and "CUDA" not in text


async def poisoned_batch(ctx: FaultContext) -> tuple[str, str, bool]:
    """A forward pass raises whenever its batch holds one poisoned request, among concurrent clean ones."""
    serving = ctx.qa_server.engine.registry.loaded(MODEL)
    model, replica = serving.model, serving.model.replicas[0]
    requests = {f"q{i}": pb.AnswerRequest(question=f"Who opened museum {i}?", context=SHORT_CONTEXT) for i in range(24)}
    requests["poison"] = pb.AnswerRequest(question="Who opened the poisoned museum?", context=SHORT_CONTEXT)
    params = model.resolve(QAParams())
    ids = {tuple(model.split(r.question, r.context, params).input_ids[0]): name for name, r in requests.items()}
    failed_batches: list[set[str]] = []
    real = replica.forward

    def forward(windows: list[Any]) -> list[Any]:
        names = {ids.get(tuple(w.input_ids), "?") for w in windows}
        if "poison" in names:
            failed_batches.append(names)
            raise RuntimeError("poisoned batch (simulated)")
        return real(windows)

    names = list(requests)
    with patched_forward(replica, forward):
        results = await asyncio.gather(*(call(ctx.stub, requests[n]) for n in names))
    statuses = {n: s for n, (s, _) in zip(names, results, strict=True)}
    shared = set().union(*failed_batches) - {"poison"}
    failed_clean = {n for n, s in statuses.items() if s != "OK" and n != "poison"}
    observed = (
        f"poisoned: {statuses['poison']}; clean: {sum(s == 'OK' for s in statuses.values())} OK, "
        f"{len(failed_clean)} failed, {len(shared)} shared its batch"
    )
    passed = (
        statuses["poison"] == "INTERNAL INFERENCE_FAILED"
        and failed_clean == shared
        and all(statuses[n] == "INTERNAL INFERENCE_FAILED" for n in failed_clean)
    )
    return observed, "poisoned and its batch-mates INTERNAL INFERENCE_FAILED, every other request OK", passed


FaultRun = Callable[[FaultContext], Awaitable[tuple[str, str, bool]]]


@dataclass(frozen=True)
class Fault:
    name: str
    run: FaultRun
    bug: str = ""


# In this order: each may rely on what the ones before it did to the models.
FAULTS: tuple[Fault, ...] = (
    Fault("weights corrupted before an unpinned model's first load", corrupted_before_load),
    Fault("model directory removed before its first load", removed_before_load),
    Fault("corrupted weights restored, LoadModel retries", restored_and_reloaded),
    Fault("a loaded model's directory removed at run time", loaded_model_dir_removed),
    Fault("a forward pass raises", forward_raises_once),
    Fault("forward raises on every batch holding a poisoned request (25 concurrent)", poisoned_batch),
)


async def fault(ctx: FaultContext, case: Fault) -> Row:
    """Runs one fault, then checks the default model still answers."""
    try:
        observed, expected, passed = await case.run(ctx)
    except Exception as error:  # a fault that breaks the suite's own steps is a failed row
        observed, expected, passed = f"suite error {type(error).__name__}: {error}", "", False
    after = await probe(ctx.stub)
    return Row(
        f"fault: {case.name}",
        expected + "; next request OK",
        f"{observed}; next request {after}",
        passed and after == "ok",
        case.bug,
    )
