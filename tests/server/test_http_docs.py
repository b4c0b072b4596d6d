"""Every example of docs/http.md (sh: curl, python: huggingface_hub and tritonclient, js: @huggingface/inference)
and of the README (the CLI, Python, curl) run as written against the embedded model, its localhost ports pointed at
the test server: each prints "Paris" at 54-59."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from qaserve.server import QAServer

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "http.md"
README = ROOT / "README.md"
NODE_EXAMPLES = ROOT / "tests" / "http_node"
RUNNERS = {"sh": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"]}


def examples(doc: Path) -> list[tuple[str, str]]:
    """The doc's fenced code blocks that run: (language, code)."""
    found = re.findall(r"^```(\w+)\n(.*?)^```", doc.read_text(), flags=re.S | re.M)
    return [(language, code) for language, code in found if language != "text"]


EXAMPLES = examples(DOC)
README_EXAMPLES = examples(README)


def test_the_doc_has_an_example_of_each_client() -> None:
    text = "\n".join(code for _, code in EXAMPLES)
    for client in ("curl", "InferenceClient", "tritonclient.http", "tritonclient.grpc", "@huggingface/inference"):
        assert client in text, client
    assert {language for language, _ in EXAMPLES} == {"sh", "python", "js"}


def test_the_readme_asks_through_the_cli_python_and_curl() -> None:
    text = "\n".join(code for _, code in README_EXAMPLES)
    for client in ("qaserve-client", "QAClient", "curl"):
        assert client in text, client


@pytest.mark.parametrize(
    ("language", "code"),
    EXAMPLES + README_EXAMPLES,
    ids=[f"http-{i}-{lang}" for i, (lang, _) in enumerate(EXAMPLES)]
    + [f"readme-{i}-{lang}" for i, (lang, _) in enumerate(README_EXAMPLES)],
)
async def test_each_example_prints_paris(embedded_server: tuple[QAServer, str, str], language: str, code: str) -> None:
    _, url, target = embedded_server
    code = code.replace("http://localhost:8080", url).replace("localhost:8080", url.removeprefix("http://"))
    code = code.replace("localhost:50051", target)
    if language == "js":
        node = shutil.which("node")
        if node is None or not (NODE_EXAMPLES / "node_modules" / "@huggingface" / "inference").is_dir():
            pytest.fail("Node.js and @huggingface/inference are needed: install nodejs, then `make node-deps`")
        command, cwd = [node, "--input-type=module", "-e", code], NODE_EXAMPLES
    else:
        command, cwd = [*RUNNERS[language], code], ROOT
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=os.environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "Paris" in text and ("54" in text and "59" in text), text
