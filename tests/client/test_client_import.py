"""The client stays light: importing it pulls in neither torch/transformers nor the server package."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import qaserve_client, qaserve_client.cli
heavy = sorted(
    name for name in sys.modules
    if name.split(".")[0] in {"torch", "transformers", "tokenizers", "numpy", "qaserve"}
)
print(",".join(heavy))
"""


def test_import_pulls_in_no_heavy_modules() -> None:
    completed = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True)

    assert completed.stdout.strip() == ""
