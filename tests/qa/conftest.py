"""The embedded model's WordPiece tokenizer, which the decoding tests build their windows with."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from qaserve.config import EMBEDDED_MODEL


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
