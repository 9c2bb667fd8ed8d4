"""Ollama model names (``qwen2.5:7b``, ``llama3.3:70b-instruct-q4_K_M``) -> the GGUF blob Ollama
already downloaded, so ``--model`` reuses what ``ollama pull`` fetched.

Ollama's store (``$OLLAMA_MODELS``, default ``~/.ollama/models``) is content-addressed::

    manifests/registry.ollama.ai/library/qwen2.5/7b     JSON: layers with media types and digests
    blobs/sha256-<hex>                                  the layers; the model layer is a GGUF file

A name is ``[host/][namespace/]model[:tag]``: host ``registry.ollama.ai``, namespace ``library``
and tag ``latest`` by default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mgpu.errors import ModelLoadError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
#: Media type of the layer that holds the weights.
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+){0,2}(:[\w.\-]+)?$")


def ollama_store() -> Path:
    """The store Ollama uses: ``$OLLAMA_MODELS`` or ``~/.ollama/models``."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def manifest_path(name: str, store: Path | None = None) -> Path:
    """Where the manifest of ``name`` lives in the store (whether or not it exists)."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return (store or ollama_store()) / "manifests" / Path(*parts) / (tag or "latest")


def looks_like_ollama_name(text: str) -> bool:
    """Whether ``--model`` text is an Ollama name rather than a path or a hub id.

    A tag (``name:tag``) makes it one; so does a bare name whose manifest is in the store.
    """
    if not _NAME.match(text):
        return False
    return ":" in text or manifest_path(text).is_file()


def resolve_ollama(name: str, store: Path | None = None) -> Path:
    """The GGUF blob of Ollama model ``name``, with a message saying how to get it when absent.

    Args:
        name: ``model[:tag]``, optionally ``namespace/`` or ``host/namespace/`` in front.
        store: the Ollama store (default :func:`ollama_store`).
    """
    store = store or ollama_store()
    manifest = manifest_path(name, store)
    if not manifest.is_file():
        raise ModelLoadError(
            f"Ollama model {name} is not in the Ollama store at {store} (no {manifest}); "
            f"download it with `ollama pull {name}`, or set OLLAMA_MODELS to the store that has it"
        )
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer["mediaType"] == MODEL_MEDIA_TYPE)
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
        raise ModelLoadError(
            f"Ollama manifest {manifest} has no model layer ({MODEL_MEDIA_TYPE}); "
            f"re-pull it with `ollama pull {name}`"
        ) from None
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelLoadError(
            f"Ollama model {name}: its weights blob {blob} is missing from the store; "
            f"re-pull it with `ollama pull {name}`"
        )
    return blob
