"""The Go, C++ and Node.js clients, each run by the make target a user runs, against a real qaserve."""

# The server is in-process, on the embedded model (it answers the seed question). Each client's own tests (Go
# `go test`, C++ GoogleTest, Node.js `node --test`) cover the seed question, the progressive stream, AnswerMany with
# a failing item, a deadline, error reasons and offsets past an emoji.
from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from qaserve.config import EMBEDDED_MODEL

from qaserve_testing import in_process_server, tiny_settings

REPO = Path(__file__).resolve().parents[2]

Make = Callable[[str], Awaitable[str]]


@pytest.fixture(scope="session")
async def embedded_target() -> AsyncIterator[str]:
    """host:port of a real grpc.aio qaserve serving the embedded model under its directory name."""
    async with in_process_server(tiny_settings(EMBEDDED_MODEL, model_name="")) as server:
        yield f"127.0.0.1:{server.port}"


def require(*tools: str) -> None:
    """Fails (CI installs them, so a missing tool is a failure, not a skip) naming the make target that installs it."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make client-deps`", pytrace=False)


@pytest.fixture
def make(embedded_target: str) -> Make:
    """Runs `make TARGET_NAME TARGET=<the server>` in the repo while this event loop serves; returns its output and
    fails with it on a non-zero exit."""

    async def run(make_target: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "make",
            "--no-print-directory",
            make_target,
            f"TARGET={embedded_target}",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=280)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        text = output.decode(errors="replace")
        assert process.returncode == 0, text
        return text

    return run


async def test_go_client(make: Make) -> None:
    require("go")
    output = await make("client-go-test")
    assert "ok  \tgithub.com/qaserve/qaserve/client/go/qaserve\t" in output, output


async def test_cpp_client(make: Make) -> None:
    require("cmake", "protoc", "grpc_cpp_plugin")
    output = await make("client-cpp-test")
    assert re.search(r"^\[  PASSED  \] [1-9]\d* tests\.$", output, re.MULTILINE), output


async def test_node_client(make: Make) -> None:
    require("node", "npm")
    output = await make("client-node-test")
    assert "# fail 0" in output, output


async def test_examples_print_the_seed_answer(make: Make) -> None:
    """`make client-examples TARGET=...`: the Go, C++ and Node.js examples each print the same JSON line."""
    require("go", "cmake", "protoc", "grpc_cpp_plugin", "node", "npm")
    output = await make("client-examples")
    printed = [line for line in output.splitlines() if line.startswith("{")]
    assert printed == ['{"answer": "Paris", "start": 54, "end": 59}'] * 3, output
    assert all(json.loads(line) == {"answer": "Paris", "start": 54, "end": 59} for line in printed)
