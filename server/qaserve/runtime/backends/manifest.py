"""The manifest `qaserve export` writes beside model.onnx, and the onnx backend reads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ONNX_FILE = "model.onnx"
# Where a model directory may hold its ONNX file: at the top (qaserve export, Optimum's exporter) or under onnx/
# (hub repositories that keep ONNX beside the checkpoint). The first found is served.
ONNX_LAYOUTS = (ONNX_FILE, f"onnx/{ONNX_FILE}")
MANIFEST_FILE = "qaserve-onnx.json"
FORMAT_VERSION = 1
QUANTIZATIONS = ("none", "int8")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class OnnxManifest:
    """How model.onnx was made: from which weights, quantized how, with which inputs, and how well it answers."""

    source_revision: str
    quantization: str  # none | int8
    opset: int
    inputs: tuple[str, ...]
    squad_v1_1_dev: dict[str, float] | None = None  # {"exact_match": x, "f1": y} where measured

    @property
    def dtype(self) -> str:
        """The dtype name the server reports: int8 for quantized weights, float32 otherwise."""
        return "int8" if self.quantization == "int8" else "float32"

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "source_revision": self.source_revision,
            "quantization": self.quantization,
            "opset": self.opset,
            "inputs": list(self.inputs),
            "squad_v1.1_dev": self.squad_v1_1_dev,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def read(cls, directory: Path) -> OnnxManifest:
        """Reads and checks the manifest; ValueError naming the file and what is wrong."""
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise ValueError(f"{MANIFEST_FILE} is missing beside {ONNX_FILE}; write both with `qaserve export`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{MANIFEST_FILE} is not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{MANIFEST_FILE}: format_version must be {FORMAT_VERSION}")
        quantization = data.get("quantization")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"{MANIFEST_FILE}: quantization must be one of {', '.join(QUANTIZATIONS)}")
        inputs = data.get("inputs")
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise ValueError(f"{MANIFEST_FILE}: inputs must be a list of input names")
        squad = data.get("squad_v1.1_dev")
        if squad is not None and not (
            isinstance(squad, dict) and all(isinstance(squad.get(k), int | float) for k in ("exact_match", "f1"))
        ):
            raise ValueError(f"{MANIFEST_FILE}: squad_v1.1_dev must be null or {{exact_match, f1}}")
        return cls(
            source_revision=str(data.get("source_revision", "")),
            quantization=str(quantization),
            opset=int(data.get("opset", 0)),
            inputs=tuple(inputs),
            squad_v1_1_dev=None if squad is None else {k: float(squad[k]) for k in ("exact_match", "f1")},
        )


def find_onnx(directory: Path) -> Path | None:
    """The model's ONNX file in one of ONNX_LAYOUTS, or None."""
    return next((directory / name for name in ONNX_LAYOUTS if (directory / name).is_file()), None)


def sha256_file(path: Path) -> str:
    """'sha256:<hex>' of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def weights_revision(source: str | Path, local: bool, config: Any) -> str:
    """The revision of a model's torch weights: sha256 of the weights file for a directory, the resolved hub
    commit (from the loaded model's `config`) otherwise. The torch backend reports it; export records it."""
    if local:
        for name in WEIGHT_FILES:
            path = Path(source) / name
            if path.is_file():
                return sha256_file(path)
        return "local"
    return str(getattr(config, "_commit_hash", None) or "unknown")
