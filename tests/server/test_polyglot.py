"""The Node.js client (tests/polyglot: @grpc/grpc-js + proto-loader on protos/) against the in-process server."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from qaserve.server import QAServer

POLYGLOT = Path(__file__).resolve().parents[1] / "polyglot"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
async def test_node_client_unary_streaming_bidi_offsets_and_reflection(tiny_server: tuple[QAServer, str]) -> None:
    if not (POLYGLOT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("the Node.js client's dependencies are missing: run `make node-deps` (npm ci in tests/polyglot)")
    _, target = tiny_server
    # Runs as a subprocess while this event loop keeps serving the in-process server.
    process = await asyncio.create_subprocess_exec(
        str(NODE),
        "--test",
        "--test-reporter=spec",
        "polyglot.test.mjs",
        cwd=POLYGLOT,
        env={**os.environ, "QASERVE_TARGET": target, "QASERVE_MODEL": "tiny", "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, output.decode(errors="replace")
