"""Find a model and load this rank's slices of its safetensors weights, strictly.

Weights are read only from safetensors (never from pickle files, which can run code when loaded).
Every parameter must be filled exactly once; a tensor missing from the checkpoint, one the model
does not know, or one with the wrong shape stops the load with its name (STYLE.md convention 8).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from mgpu.errors import ModelLoadError
from mgpu.layers.quantization import checkpoint_quant_format, finish_loading
from mgpu.models.gguf import is_gguf_file
from mgpu.models.ollama import looks_like_ollama_name, resolve_ollama

#: Checkpoint tensors that carry no weights (recomputed buffers some exporters save).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "generation_config.json",
    "special_tokens_map.json",
]


def demo_model_path() -> Path:
    """The small model bundled with the package (the default of every ``--model``)."""
    return Path(__file__).resolve().parent.parent / "demo_model"


def resolve_model_path(model: str | os.PathLike[str]) -> Path:
    """A local model for ``model``: a directory, a GGUF file, an Ollama model name (its GGUF blob
    in the Ollama store), or a hub id fetched to the local cache.

    The local cache is tried first; downloading happens only when the model is not cached. Offline
    (``HF_HUB_OFFLINE=1`` or no network) and not cached gives a message saying so.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but has no config.json: not a HF model")
        return path
    if path.is_file():
        if path.suffix == ".gguf" or is_gguf_file(path):
            return path
        raise ModelLoadError(
            f"{path} is a file; --model takes a model directory, a .gguf file or a hub id"
        )
    if looks_like_ollama_name(text):
        return resolve_ollama(text)
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model directory {text} does not exist")
    return _from_hub(text)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # not cached: fall through to a download
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelLoadError(
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it first (huggingface-cli download) or pass a local directory"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as exc:
        raise ModelLoadError(
            f"could not download {repo_id} from the Hugging Face hub ({type(exc).__name__}); it is "
            "not cached locally either: check the name and your network, or pass a local directory"
        ) from None


def safetensors_files(path: Path) -> list[Path]:
    """Checkpoint files of a model directory: the sharded index's files, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index} is malformed: {exc}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickles)}: pickle checkpoints are refused because loading them can"
            " run arbitrary code; convert them to safetensors)"
            if pickles
            else ""
        )
        raise ModelLoadError(f"no *.safetensors weights in {path}{hint}")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"checkpoint file {f} listed in the index is missing")
    return files


class _Slice:
    """Adapter giving a safetensors slice a ``.shape`` (see ``layers.linear.LazyTensor``)."""

    def __init__(self, raw: object):
        self._raw = raw
        self.shape = tuple(raw.get_shape())  # type: ignore[attr-defined]

    def __getitem__(self, index: object) -> torch.Tensor:
        if index is Ellipsis:
            return self._raw[:]  # type: ignore[index]
        return self._raw[index]  # type: ignore[index]


def load_weights(model: nn.Module, path: Path, progress: bool = False) -> None:
    """Fill every parameter of ``model`` (one rank's stage and shard) from ``path``'s safetensors.

    Args:
        model: a model built for this rank; it says which tensors it needs
            (``checkpoint_names()``) and which a full checkpoint may hold
            (``all_checkpoint_names(config)``), see :class:`~mgpu.models.base.CausalLM`.
        path: the model directory.
        progress: show a progress bar over the checkpoint files.
    """
    if path.is_file():  # resolve_model_path returns a file only for GGUF
        from mgpu.models.gguf import load_gguf_weights

        return load_gguf_weights(model, path)
    fmt = checkpoint_quant_format(path)
    if fmt is not None:  # AWQ / GPTQ
        from mgpu.layers.quantization.int4_checkpoint import load_int4_checkpoint

        known = model.all_checkpoint_names(model.config)  # type: ignore[operator]
        return load_int4_checkpoint(model, safetensors_files(path), fmt, known)
    wanted = model.checkpoint_names()  # type: ignore[operator]
    known = model.all_checkpoint_names(model.config)  # type: ignore[operator]
    pending = set(wanted)
    files = safetensors_files(path)
    for file in tqdm(files, desc="loading weights", disable=not progress, unit="file"):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from None
        with handle as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in known:
                    raise ModelLoadError(
                        f"unexpected tensor {name!r} in {file.name}: not part of a "
                        f"{model.config.architecture} with this config.json"  # type: ignore[union-attr]
                    )
                if name not in wanted:
                    continue  # another pipeline stage's layer, or a tied duplicate
                param, shard = wanted[name]
                param.checkpoint_name = name  # type: ignore[attr-defined]
                param.weight_loader(param, _Slice(f.get_slice(name)), shard)  # type: ignore[attr-defined]
                pending.discard(name)
    if pending:
        missing = sorted(pending)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(
            f"checkpoint in {path} is missing tensor(s) {', '.join(missing[:5])}{more}"
        )
    finish_loading(model)
