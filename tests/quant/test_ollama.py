"""Ollama model names resolve to the GGUF blob of an Ollama store laid out in a temp dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from mgpu import LLM, SamplingParams
from mgpu.errors import ModelLoadError
from mgpu.models.loader import resolve_model_path
from mgpu.models.ollama import resolve_ollama
from tests.helpers import make_model
from tests.quant.gguf_files import write_gguf


def _add(store: Path, manifest: Path, blob: bytes) -> Path:
    """Put ``blob`` in the store as a model layer, with a manifest at ``manifest``."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    path = store / "blobs" / digest.replace(":", "-")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    template = {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00"}
    layers = [template, {"mediaType": "application/vnd.ollama.image.model", "digest": digest}]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store holding ``tiny:q8`` (library namespace) and ``me/tiny`` (tag latest)."""
    root = tmp_path_factory.mktemp("ollama")
    model_dir = make_model(root / "hf", "qwen2", num_hidden_layers=1)
    write_gguf(model_dir, root / "tiny.gguf", T.Q8_0)
    data = (root / "tiny.gguf").read_bytes()
    store = root / "models"
    manifests = store / "manifests" / "registry.ollama.ai"
    blob = _add(store, manifests / "library" / "tiny" / "q8", data)
    _add(store, manifests / "me" / "tiny" / "latest", data)
    return store, blob


def test_names_resolve_to_the_blob(store, monkeypatch: pytest.MonkeyPatch) -> None:
    root, blob = store
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    assert resolve_model_path("tiny:q8") == blob
    assert resolve_model_path("registry.ollama.ai/library/tiny:q8") == blob
    assert resolve_model_path("me/tiny:latest") == blob
    assert resolve_ollama("me/tiny") == blob


def test_missing_model_says_how_to_get_it(store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(store[0]))
    with pytest.raises(ModelLoadError, match=r"ollama pull llama3.3:70b-instruct-q4_K_M"):
        resolve_model_path("llama3.3:70b-instruct-q4_K_M")


def test_engine_serves_an_ollama_name(store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(store[0]))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM("tiny:q8", device="cpu", num_blocks=32) as llm:
        out = llm.generate(["The quick brown fox"], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
