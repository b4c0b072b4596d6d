"""Where a model's files are: a local directory as it stands, or a hub id resolved as the Hugging Face stack does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qaserve.runtime.spec import ModelSpec

# What a hub snapshot of a question-answering model needs: config, tokenizer files (tokenizer.json, vocabularies,
# SentencePiece models) and the weights qaserve runs (safetensors, or ONNX at the top level or under onnx/). Pickled
# .bin weights, TensorFlow and Flax files are not downloaded.
HUB_FILES = [
    "*.json",
    "*.txt",
    "*.model",
    "*.safetensors",
    "model.onnx",
    "model.onnx.data",
    "model.onnx_data",
    "onnx/model.onnx",
    "onnx/model.onnx.data",
    "onnx/model.onnx_data",
]


def is_path(source: str) -> bool:
    """Whether a source names a directory (rather than a hub id): it exists, or it is written as a path."""
    return Path(source).is_dir() or source.startswith(("/", "./", "../", "~"))


def hub_snapshot(source: str, revision: str | None) -> Path:
    """The snapshot of hub id `source` at `revision` in the Hugging Face cache, downloaded there first unless it
    is cached already.

    huggingface_hub resolves it as transformers would: the cache under HF_HUB_CACHE (default $HF_HOME/hub), the
    token in HF_TOKEN (or the one `hf auth login` saved), and HF_HUB_OFFLINE=1 for the cache alone. Blocking:
    call off the event loop. ValueError says what is missing and how to get it.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{source}@{revision}" if revision else source
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise ValueError(f"hub model {at} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"hub model {at} was not found (or is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"hub model {source} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ValueError(
            f"hub model {at} is not in the Hugging Face cache (HF_HUB_CACHE or HF_HOME) and {where}"
        ) from None


def resolved(spec: ModelSpec) -> ModelSpec:
    """The spec with a hub id replaced by its snapshot directory (see hub_snapshot), where revision no longer
    applies; a spec naming a directory as it is."""
    if is_path(spec.source):
        return spec
    return dataclasses.replace(spec, source=str(hub_snapshot(spec.source, spec.revision)), revision=None)
