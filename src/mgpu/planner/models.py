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
    ollama_pull: str | None = None
    """The Ollama tag this name pulls (``llama3.3:70b-instruct-q4_K_M``), for an Ollama name."""
    notes: tuple[str, ...] = ()
    """What resolving the name or reading the file decided, for the plan's reasons."""

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
    ollama_default: dict[str, Any] | None = None
    """Ollama's default tag for :attr:`ollama` (``tag``), whether ``latest`` points to it, and the
    tags page it was read from (``source``)."""

    @property
    def architecture(self) -> str:
        """The Hugging Face architecture name (``LlamaForCausalLM``)."""
        return str(self.config["architectures"][0])

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
            ollama_default=m.get("ollama_default"),
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
    from mgpu.planner.ollama import resolve_ollama_name  # ollama needs this module's catalogue

    pull = resolve_ollama_name(text)
    if pull is not None:
        return ModelSpec(
            name=pull.entry.name,
            config=model_config(pull.entry.config),
            source=pull.entry.source,
            hf_id=pull.entry.hf_id,
            implied_quantization=pull.quantization,
            ollama_pull=pull.tag,
            notes=(pull.describe(),),
        )
    entry = find_catalogue_model(text)
    implied, _ = find_quantization_tag(text)
    return ModelSpec(
        name=entry.name,
        config=model_config(entry.config),
        source=entry.source,
        hf_id=entry.hf_id,
        implied_quantization=implied,
    )


def model_config(raw: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from config.json fields, Qwen3-MoE's expert names included.

    Qwen3-MoE calls its experts ``num_experts`` and their width ``moe_intermediate_size``; with
    every layer sparse (``decoder_sparse_step`` 1, no ``mlp_only_layers``) its dense
    ``intermediate_size`` is never used, so the expert width takes its place for the memory and
    speed formulas, as Mixtral's ``num_local_experts`` and ``intermediate_size`` do.

    Args:
        raw: the parsed config.json (or a catalogue entry's config).
    """
    sparse_everywhere = raw.get("decoder_sparse_step", 1) == 1 and not raw.get("mlp_only_layers")
    if "num_experts" in raw and "num_local_experts" not in raw and sparse_everywhere:
        raw = {**raw, "num_local_experts": raw["num_experts"]}
        if raw.get("moe_intermediate_size"):
            raw["intermediate_size"] = raw["moe_intermediate_size"]
    return ModelConfig.from_dict(raw)


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
        config=model_config(text_raw),
        source=str(path / "config.json"),
        path=str(path),
        implied_quantization=_hf_quantization(raw),
    )


# GGUF architecture names and the Hugging Face classes they were converted from; llama.cpp writes
# Mistral as "llama" and Mixtral as "llama" with experts.
_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

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

# GGML tensor types by their planner names; K-quant "mixes" are told apart by file type or by the
# Q6_K tensors llama-quantize adds to the _M mixes.
_GGML_TYPES = {
    "F32": "f32",
    "F16": "f16",
    "BF16": "bf16",
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
    "Q5_0": "q5_0",
    "Q5_1": "q5_1",
    "Q8_0": "q8_0",
    "Q2_K": "q2_k",
    "Q3_K": "q3_k_m",
    "Q6_K": "q6_k",
}


def _file_type_name(value: Any) -> str | None:
    """``general.file_type`` (llama.cpp's LLAMA_FTYPE) as a planner name: 15 is ``q4_k_m``."""
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return None
    if name == "GUESSED":
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _tensor_type_name(elements: dict[str, int]) -> str:
    """The precision of the type holding most matrix elements (``Q4_K`` with Q6_K: ``q4_k_m``)."""
    dominant = max(elements, key=lambda k: elements[k])
    if dominant in ("Q4_K", "Q5_K"):
        return dominant.lower() + ("_m" if "Q6_K" in elements else "_s")
    return _GGML_TYPES.get(dominant, dominant.lower())


def _base_type(name: str) -> str:
    """The tensor type a precision is built on: ``q4_k_m`` -> ``Q4_K``."""
    upper = name.upper()
    return upper[:4] if "_K" in upper else upper


def gguf_quantization(file_type: Any, elements: dict[str, int]) -> tuple[str, str | None]:
    """A GGUF file's precision from its ``general.file_type`` and the types of its matrices.

    The file type names the mix (``Q4_K_M``) and is kept when the tensors agree with it; a missing
    or contradicted file type gives way to the tensors, and the note says so.

    Args:
        file_type: the ``general.file_type`` value, or None.
        elements: matrix elements per GGML tensor type name (``{"Q8_0": 1234}``).

    Returns:
        The planner's name for the precision and a note, or None when the two sources agree.
    """
    from_tensors = _tensor_type_name(elements)
    declared = None if file_type is None else _file_type_name(file_type)
    dominant = max(elements, key=lambda k: elements[k]).upper()
    if declared is None:
        return from_tensors, (
            f"The file declares no general.file_type; most of its matrix weights are {dominant}, "
            f"so it is planned as {from_tensors}."
        )
    if _base_type(declared) != dominant:
        return from_tensors, (
            f"The file's general.file_type says {declared} but most of its matrix weights are "
            f"{dominant}: planned as {from_tensors}."
        )
    return declared, None


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
    raw: dict[str, Any] = {"model_type": arch}
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
    expert_width = field(f"{arch}.expert_feed_forward_length")
    if expert_width and raw.get("num_local_experts"):
        raw["intermediate_size"] = expert_width  # Qwen3-MoE: every layer's MLP is its experts
    hf_arch = _GGUF_ARCHITECTURES.get(str(arch), str(arch))
    if hf_arch == "LlamaForCausalLM" and raw.get("num_local_experts"):
        hf_arch = "MixtralForCausalLM"
    raw["architectures"] = [hf_arch]
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

    matrices = [t for t in reader.tensors if len(t.shape) >= 2]
    if not matrices:
        raise ConfigError(f"{path} holds no weight matrices")
    matrix_bytes = sum(int(t.n_bytes) for t in matrices)
    matrix_elements = sum(int(t.n_elements) for t in matrices)
    by_type: dict[str, int] = {}
    for tensor in matrices:
        kind = tensor.tensor_type.name
        by_type[kind] = by_type.get(kind, 0) + int(tensor.n_elements)
    quantization, note = gguf_quantization(field("general.file_type"), by_type)
    return ModelSpec(
        name=path.stem,
        config=model_config(raw),
        source=str(path),
        path=str(path),
        is_gguf_file=True,
        implied_quantization=quantization,
        file_bits_per_weight=8 * matrix_bytes / matrix_elements,
        notes=(note,) if note else (),
    )
