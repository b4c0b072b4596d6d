"""A server whose models are all ONNX needs no torch: it starts, answers and never imports it."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import pytest

from qaserve_client.v1 import question_answering_pb2 as pb
from qaserve_client.v1 import question_answering_pb2_grpc as pb_grpc

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, free_port, start_qaserve, wait_serving

# Runs `qaserve` with torch absent ("absent": importing it fails and importlib finds no such package, exactly as
# without the wheel) or present ("installed"), and writes the torch modules loaded by exit to a report file.
WRAPPER = """
import atexit, json, sys
mode, report = sys.argv.pop(1), sys.argv.pop(1)
if mode == "absent":
    sys.modules["torch"] = None
def write():
    with open(report, "w") as f:
        json.dump(sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None), f)
atexit.register(write)
from qaserve.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("torch", ["absent", "installed"])
async def test_onnx_only_server_answers_without_torch(tiny_onnx_dir: Path, tmp_path: Path, torch: str) -> None:
    report = tmp_path / "torch-modules.json"
    port = free_port()
    process = await start_qaserve(
        "serve",
        *("--model", str(tiny_onnx_dir), "--model-name", "tiny"),
        *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--drain-seconds", "0"),
        launcher=("-c", WRAPPER, torch, str(report)),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel, process)
            stub = pb_grpc.QuestionAnsweringServiceStub(channel)
            response = await stub.Answer(pb.AnswerRequest(question=SEED_QUESTION, context=SEED_CONTEXT), timeout=30)
        [best] = response.answers
        assert best.answer == SEED_CONTEXT[best.start : best.end]
        assert response.model.dtype == "float32" and response.model.revision.startswith("sha256:")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert json.loads(report.read_text()) == []
