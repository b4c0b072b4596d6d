"""`qaserve export`: writes a question-answering checkpoint as an ONNX model directory the onnx backend serves."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qaserve.errors import first_line
from qaserve.runtime.backends.manifest import MANIFEST_FILE, ONNX_FILE, QUANTIZATIONS, OnnxManifest, weights_revision

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# Files of a checkpoint directory that are not copied into an export: weights of other formats.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".onnx.data")


def export(
    model_dir: str,
    out_dir: Path,
    *,
    quantize: str = "none",
    opset: int = DEFAULT_OPSET,
    squad: dict[str, float] | None = None,
    revision: str | None = None,
) -> OnnxManifest:
    """Exports `model_dir` (a local directory or a hub id) to out_dir/model.onnx + qaserve-onnx.json, beside the
    tokenizer files and config.json.

    Everything is written into a temporary directory next to out_dir first and moved in at the end, model.onnx
    last, so a server never sees a half-written export. Other files already in out_dir stay (out_dir may be
    model_dir itself: the ONNX file then ships beside the checkpoint).
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}")
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    source = Path(model_dir)
    local = source.is_dir()
    if not local and (source.exists() or model_dir.startswith(("/", "./", "../", "~"))):
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=out_dir.parent) as tmp:
        staging = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=None if local else revision)
        module = AutoModelForQuestionAnswering.from_pretrained(
            model_dir, revision=None if local else revision, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        inputs: list[str] = [
            name for name in ("input_ids", "attention_mask", "token_type_ids") if name in _forward_inputs(module)
        ]
        if "token_type_ids" not in tokenizer.model_input_names and "token_type_ids" in inputs:
            inputs.remove("token_type_ids")
        fp32 = staging / ("model.fp32.onnx" if quantize == "int8" else ONNX_FILE)
        _export_onnx(module, inputs, fp32, opset)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # Per-channel int8 weights: -0.49 F1 on SQuAD v1.1 dev for the embedded model; per-tensor costs ~3.
            quantize_dynamic(fp32, staging / ONNX_FILE, per_channel=True, weight_type=QuantType.QInt8)
            fp32.unlink()
        if local:
            for path in source.iterdir():
                if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != MANIFEST_FILE:
                    shutil.copy2(path, staging / path.name)
        else:
            tokenizer.save_pretrained(staging)
            module.config.save_pretrained(staging)
        manifest = OnnxManifest(
            source_revision=weights_revision(source, local, module.config),
            quantization=quantize,
            opset=opset,
            inputs=tuple(inputs),
            squad_v1_1_dev=squad,
        )
        (staging / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        _move_in(staging, out_dir)
    return manifest


def _forward_inputs(module: Any) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _export_onnx(module: Any, inputs: list[str], path: Path, opset: int) -> None:
    """Traces the model with dynamic batch and sequence axes; outputs start_logits and end_logits."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.model(**dict(zip(inputs, args, strict=True)))
            return output.start_logits, output.end_logits

    example = tuple(torch.ones((2, 16), dtype=torch.long) for _ in inputs)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*inputs, "start_logits", "end_logits")}
    with torch.inference_mode(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy and that traced Python conditions become constants;
        # both are expected here (the traced conditions hold for every batch and sequence length).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(module),
            example,
            str(path),
            input_names=inputs,
            output_names=["start_logits", "end_logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


def _move_in(staging: Path, out_dir: Path) -> None:
    """A new out_dir is the staging directory renamed; into an existing one, each file replaces its namesake
    (an atomic rename each), model.onnx last so a directory only looks like an ONNX export once it is one."""
    if not out_dir.exists():
        staging.rename(out_dir)
        staging.mkdir()  # TemporaryDirectory removes it again
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == ONNX_FILE)
    for name in names:
        os.replace(staging / name, out_dir / name)


def record_scores(out_dir: Path, exact_match: float, f1: float) -> OnnxManifest:
    """Writes measured SQuAD v1.1 dev scores into an export's manifest (atomically)."""
    import dataclasses

    manifest = dataclasses.replace(
        OnnxManifest.read(out_dir), squad_v1_1_dev={"exact_match": float(exact_match), "f1": float(f1)}
    )
    tmp = out_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST_FILE)
    return manifest


def main(argv: Sequence[str]) -> int:
    """`qaserve export MODEL_DIR OUT_DIR [--quantize int8] [--opset N] [--squad-em X --squad-f1 Y]`."""
    parser = argparse.ArgumentParser(
        prog="qaserve export",
        description="Export a question-answering model to ONNX for the onnx backend. OUT_DIR is servable as it "
        "stands (tokenizer, config.json, model.onnx, qaserve-onnx.json) and may be MODEL_DIR itself.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (or hub id where reachable)")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write (created if missing)")
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS, default="none", help="int8: dynamic per-channel int8 weights"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset [default %(default)s]")
    parser.add_argument("--revision", default=None, help="hub revision when MODEL_DIR is a hub id")
    parser.add_argument("--squad-em", type=float, help="measured SQuAD v1.1 dev exact match, for the manifest")
    parser.add_argument("--squad-f1", type=float, help="measured SQuAD v1.1 dev F1, for the manifest")
    parser.add_argument(
        "--scores-only",
        action="store_true",
        help="only record --squad-em/--squad-f1 in OUT_DIR's existing manifest (after measuring the export)",
    )
    args = parser.parse_args(argv)
    if (args.squad_em is None) != (args.squad_f1 is None):
        parser.error("--squad-em and --squad-f1 go together")
    if args.opset < 14:
        parser.error("--opset must be at least 14")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.scores_only:
            if args.squad_em is None:
                parser.error("--scores-only needs --squad-em and --squad-f1")
            record_scores(args.out_dir, args.squad_em, args.squad_f1)
            print(f"recorded SQuAD v1.1 dev scores in {args.out_dir / MANIFEST_FILE}")
            return 0
        squad = None if args.squad_em is None else {"exact_match": args.squad_em, "f1": args.squad_f1}
        manifest = export(
            args.model_dir, args.out_dir, quantize=args.quantize, opset=args.opset, squad=squad, revision=args.revision
        )
    except ImportError as error:
        print(f"qaserve export needs the torch extra (pip install 'qaserve[torch]'): {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"qaserve export: {first_line(error)}", file=sys.stderr)
        return 1
    inputs = ", ".join(manifest.inputs)
    print(f"exported {args.model_dir} to {args.out_dir / ONNX_FILE} ({manifest.dtype}, inputs {inputs})")
    return 0
