"""Where a plan's model comes from: a local Hugging Face directory, a GGUF file, or the catalogue.

The catalogue (``data/models.json``) stores each model as the fields of its own ``config.json``, so
every source ends in the same :class:`mgpu.config.ModelConfig` and the same memory formula.

Names are matched the way people write them. ``meta-llama/Llama-3.3-70B-Instruct``,
``Llama-3.3-70B`` and ``llama3.3:70b-instruct-q4_K_M`` all reduce to the key ``llama33|70b``: the
organisation, packaging words (instruct, chat, hf, it, gguf) and any precision tag are dropped,
the size is kept apart from the family so that ``qwen2-57b`` can never match ``qwen2.5-7b``, and
the rest is joined without punctuation.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from mgpu.config import ModelConfig, read_config_json
from mgpu.errors import ConfigError
from mgpu.memory import rank_weights
from mgpu.planner.quant import find_quantization_tag

_NOISE = {
    "instruct",
    "chat",
    "hf",
    "it",
    "base",
    "gguf",
    "latest",
    "meta",
    "text",
    "preview",
    "model",
}
_SIZE = re.compile(r"^(\d+x)?\d+(\.\d+)?[bm]$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to plan for, with the precision its name or files imply."""

    name: str
    config: ModelConfig
    source: str
    hf_id: str | None = None
    path: str | None = None
    is_gguf_file: bool = False
    implied_quantization: str | None = None
    file_bits_per_weight: float | None = None

    @property
    def num_params(self) -> int:
        """Total parameters (every expert of a mixture counted)."""
        counts = rank_weights(self.config)
        return counts.matrix_elements + counts.vector_elements

    @property
    def num_active_params(self) -> int:
        """Parameters read for one token: a mixture of experts reads only its active experts."""
        model = self.config
        if not model.is_moe:
            return self.num_params
        per_expert = 3 * model.hidden_size * model.intermediate_size * model.num_hidden_layers
        idle = model.num_local_experts - model.num_experts_per_tok
        return self.num_params - idle * per_expert


def name_key(text: str) -> str:
    """Reduce a model name to its matching key (see the module docstring).

    Args:
        text: a model name in any common spelling.
    """
    _, rest = find_quantization_tag(text.strip())
    rest = rest.lower().rstrip("/").rsplit("/", 1)[-1]
    tokens = [t for t in re.split(r"[-_:\s]+", rest) if t and t not in _NOISE]
    sizes = [t for t in tokens if _SIZE.match(t)]
    family = "".join(t for t in tokens if not _SIZE.match(t)).replace(".", "")
    return f"{family}|{sizes[0] if sizes else ''}"


@dataclass(frozen=True)
class CatalogueEntry:
    """One catalogue model: its names, its config fields and where they come from."""

    name: str
    hf_id: str
    ollama: str | None
    aliases: tuple[str, ...]
    source: str
    config: dict[str, Any]

    def spellings(self) -> list[str]:
        """Every name this entry answers to."""
        names = [self.name, self.hf_id, *self.aliases]
        return names + ([self.ollama] if self.ollama else [])


@cache
def catalogue() -> tuple[CatalogueEntry, ...]:
    """The built-in model catalogue."""
    raw = json.loads(resources.files("mgpu.planner").joinpath("data/models.json").read_text())
    return tuple(
        CatalogueEntry(
            name=m["name"],
            hf_id=m["hf_id"],
            ollama=m.get("ollama"),
            aliases=tuple(m.get("aliases", ())),
            source=m["source"],
            config=m["config"],
        )
        for m in raw["models"]
    )


@cache
def _index() -> dict[str, CatalogueEntry]:
    index: dict[str, CatalogueEntry] = {}
    for entry in catalogue():
        for spelling in entry.spellings():
            key = name_key(spelling)
            clash = index.get(key)
            if clash is not None and clash is not entry:
                raise ValueError(
                    f"models.json: {spelling!r} matches both {clash.name} and {entry.name}"
                )
            index[key] = entry
    return index


def find_catalogue_model(text: str) -> CatalogueEntry:
    """Look a model up in the catalogue by any common spelling of its name.

    Args:
        text: e.g. ``Llama-3.3-70B``, ``meta-llama/Llama-3.3-70B-Instruct``, ``llama3.3:70b``.

    Raises:
        ConfigError: when nothing matches, listing the closest catalogue names.
    """
    entry = _index().get(name_key(text))
    if entry is not None:
        return entry
    names = [e.name for e in catalogue()]
    spellings = {s.lower(): e.name for e in catalogue() for s in e.spellings()}
    close = difflib.get_close_matches(text.strip().lower(), list(spellings), n=6, cutoff=0.5)
    suggestions = list(dict.fromkeys(spellings[c] for c in close))[:3]
    hint = f" Closest: {', '.join(suggestions)}." if suggestions else ""
    raise ConfigError(
        f"unknown model {text!r}.{hint} Give a catalogue name ({', '.join(names)}), "
        "a Hugging Face model directory with a config.json, or a .gguf file."
    )


def load_model(text: str) -> ModelSpec:
    """Resolve ``--model``: an existing directory, an existing ``.gguf`` file, or a catalogue name.

    Args:
        text: the ``--model`` value.

    Raises:
        ConfigError: for an unknown name or an unreadable file.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        return model_from_hf_dir(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return model_from_gguf(path)
        if path.name == "config.json":
            return model_from_hf_dir(path.parent)
        raise ConfigError(f"{path} is neither a model directory nor a .gguf file")
    if text.lower().endswith(".gguf"):
        raise ConfigError(f"no GGUF file at {path}")
    entry = find_catalogue_model(text)
    implied, _ = find_quantization_tag(text)
    return ModelSpec(
        name=entry.name,
        config=ModelConfig.from_dict(entry.config),
        source=entry.source,
        hf_id=entry.hf_id,
        implied_quantization=implied,
    )


def _hf_quantization(raw: dict[str, Any]) -> str | None:
    """The precision a HF ``config.json`` declares (quantization_config, else torch_dtype)."""
    quant = raw.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    bits = quant.get("bits")
    if method in ("gptq", "awq") and bits in (4, None):
        return f"{method}-int4"
    if method == "fp8":
        return "fp8"
    if method == "bitsandbytes":
        return "nf4" if quant.get("load_in_4bit") else "int8"
    if method == "exl2" and bits:
        return f"exl2-{float(bits):g}"
    # compressed-tensors (llm-compressor) describes its weights per group of layers.
    groups = quant.get("config_groups") or {}
    for weights in (g.get("weights") or {} for g in groups.values()):
        kind, width = weights.get("type"), weights.get("num_bits")
        if (kind, width) == ("float", 8):
            return "fp8"
        if (kind, width) in (("int", 8), ("int", 4)):
            return f"int{width}"
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "").lower()
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype)


def model_from_hf_dir(path: Path) -> ModelSpec:
    """Read a Hugging Face model directory's ``config.json``.

    Args:
        path: the directory.
    """
    raw = read_config_json(path)
    # Multimodal checkpoints keep the language model's numbers under text_config.
    text_raw = {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw
    return ModelSpec(
        name=path.name,
        config=ModelConfig.from_dict(text_raw),
        source=str(path / "config.json"),
        path=str(path),
        implied_quantization=_hf_quantization(raw),
    )


# GGUF metadata keys that become config.json fields; "{a}" is the file's general.architecture.
_GGUF_FIELDS = {
    "hidden_size": "{a}.embedding_length",
    "intermediate_size": "{a}.feed_forward_length",
    "num_hidden_layers": "{a}.block_count",
    "num_attention_heads": "{a}.attention.head_count",
    "num_key_value_heads": "{a}.attention.head_count_kv",
    "max_position_embeddings": "{a}.context_length",
    "head_dim": "{a}.attention.key_length",
    "num_local_experts": "{a}.expert_count",
    "num_experts_per_tok": "{a}.expert_used_count",
    "vocab_size": "{a}.vocab_size",
    "rope_theta": "{a}.rope.freq_base",
    "rms_norm_eps": "{a}.attention.layer_norm_rms_epsilon",
}

# llama.cpp's LLAMA_FTYPE values for the precisions the planner knows.
_GGUF_FILE_TYPES = {
    0: "f32",
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    7: "q8_0",
    8: "q5_0",
    9: "q5_1",
    10: "q2_k",
    12: "q3_k_m",
    14: "q4_k_s",
    15: "q4_k_m",
    16: "q5_k_s",
    17: "q5_k_m",
    18: "q6_k",
    32: "bf16",
}


def model_from_gguf(path: Path) -> ModelSpec:
    """Read a GGUF file's metadata and tensor table (memory-mapped: nothing large is loaded).

    The file's own tensor sizes give its exact bits per weight, so a plan for a GGUF file uses what
    the file really holds rather than the nominal rate of its type.

    Args:
        path: the ``.gguf`` file.
    """
    from gguf import GGUFReader  # deferred: only GGUF inputs need it

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from None

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    arch = field("general.architecture")
    if not arch:
        raise ConfigError(f"{path} has no general.architecture; is it a GGUF model file?")
    raw: dict[str, Any] = {"architectures": [f"{arch}"], "model_type": arch}
    for name, key in _GGUF_FIELDS.items():
        value = field(key.format(a=arch))
        if isinstance(value, list):
            # Some architectures store per-layer head counts; the largest layer sizes the cache.
            value = max(value)
        if value is not None:
            raw[name] = value
    if "vocab_size" not in raw:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            raw["vocab_size"] = len(tokens.data)
    names = {t.name for t in reader.tensors}
    raw["tie_word_embeddings"] = "output.weight" not in names
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw
    ]
    if missing:
        raise ConfigError(
            f"{path}: GGUF metadata lacks {', '.join(missing)} for architecture {arch}"
        )
    if "intermediate_size" not in raw:
        raise ConfigError(f"{path}: GGUF metadata lacks {arch}.feed_forward_length")

    matrix_bytes = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) >= 2)
    matrix_elements = sum(int(t.n_elements) for t in reader.tensors if len(t.shape) >= 2)
    bits = 8 * matrix_bytes / matrix_elements if matrix_elements else None
    file_type = field("general.file_type")
    return ModelSpec(
        name=path.stem,
        config=ModelConfig.from_dict(raw),
        source=str(path),
        path=str(path),
        is_gguf_file=True,
        implied_quantization=_GGUF_FILE_TYPES.get(int(file_type))
        if file_type is not None
        else None,
        file_bits_per_weight=bits,
    )
