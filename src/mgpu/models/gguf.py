"""GGUF files (llama.cpp, Ollama) as mgpu models: config, tensors, tokenizer, loading.

A GGUF file carries everything a Hugging Face directory does, in llama.cpp's names:

- the architecture numbers in ``{arch}.*`` metadata, turned into the ``config.json`` dict that
  :meth:`ModelConfig.from_dict` reads (:func:`gguf_config_dict`);
- the tokenizer (vocabulary, merges, special token ids, chat template) in ``tokenizer.*``
  metadata, rebuilt as a ``transformers`` fast tokenizer (:func:`gguf_tokenizer`);
- the tensors, under llama.cpp's names (``blk.3.attn_q.weight``) and in its layout: dims
  reversed (``ne = (K, N)``), and for llama the q/k rows of each head permuted from HF's
  ``[first half | second half]`` RoPE order to interleaved pairs by the converter.
  :class:`GGUFTensor` undoes the permutation on read, so every HF-named weight loader works.

Only the rows (and, for row-parallel shards, the block columns) a rank owns are read from the
memory-mapped file; block types are converted per shard (``layers.quantization.gguf``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mgpu.config import ModelConfig
from mgpu.errors import ModelLoadError, UnsupportedModelError
from mgpu.layers.quantization import finish_loading
from mgpu.layers.quantization.gguf import (
    BLOCK_TYPES,
    FLOAT_TYPES,
    INT4_TYPES,
    SUPPORTED_TYPES,
    decode_blocks,
    to_packed,
)
from mgpu.layers.quantization.method import DEFAULT_INT4_GROUP_SIZE, WeightOnlyConfig
from mgpu.layers.quantization.weights import Int4Weight, PackedWeight
from mgpu.memory import LinearStorage, WeightFormat

#: GGUF ``general.architecture`` -> (HF architecture, HF model_type).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
#: Architectures whose converter permutes the q/k rows (HF's RoPE halves -> interleaved pairs).
_PERMUTED = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
#: Tensors the converter writes that carry no weights mgpu loads (RoPE factors are read into
#: the config instead, see :func:`_llama3_rope_scaling`).
_IGNORED = ("rope_freqs.weight",)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face checkpoint name of a llama.cpp tensor name (None when unknown)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path``, with a message naming the file when it is not one."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # truncated files raise ValueError/IndexError from numpy
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); a truncated "
            "download is the usual cause: fetch the file again"
        ) from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelLoadError(f"GGUF metadata field {key!r} is missing: cannot build the config")
    return value


def architecture(reader: Any, path: Path) -> str:
    """``general.architecture``, refused unless mgpu implements it."""
    arch = str(_require(reader, "general.architecture"))
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; mgpu runs GGUF files of "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


def _llama3_rope_scaling(
    factors: np.ndarray, head_dim: int, theta: float, original: int | None
) -> dict[str, Any]:
    """Recover llama3 RoPE scaling from the ``rope_freqs`` factors the converter stores.

    The converter computes the factors from (factor, low_freq_factor, high_freq_factor,
    original context); Llama 3.1-3.3 all use low 1, high 4, original 8192. The candidate is
    accepted only if it reproduces every stored factor.
    """
    factor = float(factors.max())
    low, high, old = 1.0, 4.0, float(original or 8192)
    freqs = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    expected = np.where(
        wavelen < old / high,
        1.0,
        np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise ModelLoadError(
            "GGUF tensor rope_freqs.weight does not match llama3 RoPE scaling with low/high "
            "frequency factors 1/4: this RoPE variant is not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(old),
    }


def gguf_config_dict(reader: Any, path: Path) -> dict[str, Any]:
    """The HF ``config.json`` dict equivalent to a GGUF file's metadata."""
    arch = architecture(reader, path)
    hf_arch, model_type = ARCHITECTURES[arch]

    def key(name: str) -> str:
        return f"{arch}.{name}"

    names = {t.name for t in reader.tensors}
    hidden = int(_require(reader, key("embedding_length")))
    heads = int(_require(reader, key("attention.head_count")))
    head_dim = int(_field(reader, key("attention.key_length"), hidden // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, key("vocab_size"), len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = int(_tensor(reader, "token_embd.weight").shape[1])
    theta = float(_field(reader, key("rope.freq_base"), 10000.0))
    rope: dict[str, Any] | None = None
    if "rope_freqs.weight" in names:
        factors = np.asarray(_tensor(reader, "rope_freqs.weight").data, dtype=np.float64)
        original = _field(reader, key("rope.scaling.original_context_length"))
        rope = _llama3_rope_scaling(factors, head_dim, theta, original)
    elif _field(reader, key("rope.scaling.type")) not in (None, "none"):
        raise ModelLoadError(
            f"GGUF metadata {key('rope.scaling.type')} = "
            f"{_field(reader, key('rope.scaling.type'))!r} is not supported"
        )
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    raw: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, key("feed_forward_length"))),
        "num_hidden_layers": int(_require(reader, key("block_count"))),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, key("attention.head_count_kv"), heads)),
        "head_dim": head_dim,
        "vocab_size": int(vocab),
        "max_position_embeddings": int(_field(reader, key("context_length"), 2048)),
        "rms_norm_eps": float(_field(reader, key("attention.layer_norm_rms_epsilon"), 1e-6)),
        "rope_theta": theta,
        "rope_scaling": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": _file_dtype(reader),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
        "use_sliding_window": False,
    }
    return raw


def _tensor(reader: Any, name: str) -> Any:
    for t in reader.tensors:
        if t.name == name:
            return t
    raise ModelLoadError(f"GGUF file has no tensor {name!r}")


def _file_dtype(reader: Any) -> str:
    """float32 / float16 / bfloat16 for float files; bfloat16 (the int kernels') for quantized."""
    from gguf import GGMLQuantizationType as T

    types = {T(t.tensor_type) for t in reader.tensors if t.name.endswith(".weight")}
    if types & set(BLOCK_TYPES):
        return "bfloat16"
    for qtype, name in ((T.F16, "float16"), (T.BF16, "bfloat16")):
        if qtype in types:
            return name
    return "float32"


def gguf_model_config(path: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF file, from its metadata alone (its tensor types are
    checked here too, so an unreadable file fails before any worker starts)."""
    reader = open_gguf(path)
    config = ModelConfig.from_dict(gguf_config_dict(reader, path))
    gguf_tensors(reader, config, path)
    return config


def gguf_quant_config(path: Path, name: str | None) -> WeightOnlyConfig | None:
    """The quantization of a GGUF model: the file's block types (converted per shard), and for
    its float tensors ``--quantization NAME`` if given.

    Returns None for an all-float file without ``--quantization`` (plain float linears).
    """
    from gguf import GGMLQuantizationType as T

    reader = open_gguf(path)
    quantized = any(T(t.tensor_type) in BLOCK_TYPES for t in reader.tensors)
    bits = {None: None, "int8": 8, "int4": 4}.get(name, -1)
    if bits == -1:
        from mgpu.layers.quantization import get_quantization_config

        get_quantization_config(name)  # raises the unknown-name error
    if not quantized and bits is None:
        return None
    return WeightOnlyConfig(name="gguf" if name is None else f"gguf+{name}", bits=bits)


def gguf_weight_format(path: Path, float_bits: int | None, dtype_bytes: int) -> WeightFormat:
    """What loading ``path`` stores for each projection, from its tensor table (the conversion
    of ``layers.quantization.gguf``: Q4_0/Q4_K exactly to int4 in groups of 32, the other block
    types to per-row int8, float tensors kept or quantized by ``--quantization``).

    Args:
        path: the GGUF file.
        float_bits: ``--quantization`` bits for the float tensors (None keeps them float).
        dtype_bytes: bytes per element of the model dtype.
    """
    reader = open_gguf(path)
    config = ModelConfig.from_dict(gguf_config_dict(reader, path))
    on_float = {
        None: LinearStorage("float", dtype_bytes),
        8: LinearStorage("int8", dtype_bytes),
        4: LinearStorage("int4", dtype_bytes, DEFAULT_INT4_GROUP_SIZE),
    }[float_bits]
    per_tensor = []
    for name, tensor in gguf_tensors(reader, config, path).items():
        if tensor.qtype in INT4_TYPES:
            storage = LinearStorage("int4", dtype_bytes, 32)
        elif tensor.qtype in BLOCK_TYPES:
            storage = LinearStorage("int8", dtype_bytes)
        else:
            storage = on_float
        per_tensor.append((name, storage))
    return WeightFormat(on_float, dtype_bytes, tuple(per_tensor))


class GGUFTensor:
    """One GGUF tensor, read lazily in Hugging Face layout (see the module docstring).

    Args:
        tensor: the ``gguf`` reader's tensor (memory-mapped data).
        row_order: for permuted q/k tensors, HF row -> GGUF row; None for identity.
    """

    def __init__(self, tensor: Any, row_order: np.ndarray | None = None):
        from gguf import GGMLQuantizationType as T

        self.name = tensor.name
        self.qtype = T(tensor.tensor_type)
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        self._data = tensor.data  # (N, K) floats or (N, bytes) blocks, memory-mapped
        self._row_order = row_order

    def _raw(self, rows: slice) -> np.ndarray:
        if self._row_order is None:
            return np.array(self._data[rows])
        return np.array(self._data[self._row_order[rows]])

    def _float_rows(self, rows: slice, cols: slice) -> torch.Tensor:
        from gguf import GGMLQuantizationType as T

        raw = self._raw(rows)
        if self.qtype == T.BF16:
            t = torch.from_numpy(raw).view(torch.bfloat16)
        else:
            t = torch.from_numpy(raw)
        return t[..., cols].float()

    def _blocks(self, rows: slice, cols: slice) -> Any:
        """Decoded blocks of ``rows`` covering columns ``cols``, cut to them."""
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        start, stop = cols.start or 0, self.shape[1] if cols.stop is None else cols.stop
        first, last = start // block, -(-stop // block)
        raw = self._raw(rows)[:, first * size : last * size]
        blocks = decode_blocks(torch.from_numpy(raw), self.qtype)
        lo, hi = start - first * block, stop - first * block
        if lo % blocks.group or hi % blocks.group:
            raise ModelLoadError(
                f"GGUF tensor {self.name} ({self.qtype.name}): columns [{start}, {stop}) of this "
                f"shard do not fall on {blocks.group}-element sub-blocks; use a tensor-parallel "
                "size that splits the width into multiples of 32"
            )
        return blocks.cut(lo, hi)

    def __getitem__(self, index: object) -> torch.Tensor:
        """Float32 values of ``[...]``, ``[rows]`` or ``[rows, cols]`` in HF layout."""
        if index is Ellipsis:
            rows, cols = slice(None), slice(None)
        elif isinstance(index, tuple):
            rows, cols = index  # type: ignore[misc]
        else:
            rows, cols = index, slice(None)  # type: ignore[assignment]
        if len(self.shape) == 1:
            return torch.from_numpy(self._raw(rows).astype(np.float32))
        if self.qtype in FLOAT_TYPES:
            return self._float_rows(rows, cols)
        start, stop = cols.start or 0, self.shape[1] if cols.stop is None else cols.stop
        block = decode_blocks(torch.from_numpy(self._raw(rows)), self.qtype)
        return block.to_float()[:, start:stop]

    def read_packed(self, rows: slice, cols: slice | None) -> PackedWeight | torch.Tensor:
        """This shard in mgpu's int4/int8 form (block types) or as float32 (float types)."""
        cols = cols or slice(0, self.shape[1])
        if self.qtype in FLOAT_TYPES:
            return self._float_rows(rows, cols)
        packed = to_packed(self._blocks(rows, cols), self.qtype)
        assert not isinstance(packed, Int4Weight) or packed.group_size == 32
        return packed


def _row_order(rows: int, heads: int) -> np.ndarray:
    """HF row -> GGUF row of a q/k tensor the converter permuted with ``heads`` heads.

    The converter writes ``w.reshape(heads, 2, d/2, K).swapaxes(1, 2)``: HF row ``j * d/2 + i``
    of a head lands on GGUF row ``2 i + j``.
    """
    src = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    return np.argsort(src)  # src[g] = HF row written at GGUF row g


def gguf_tensors(reader: Any, config: ModelConfig, path: Path) -> dict[str, GGUFTensor]:
    """Every tensor of the file under its HF name, lazily readable in HF layout."""
    arch = architecture(reader, path)
    out: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        from gguf import GGMLQuantizationType as T

        qtype = T(t.tensor_type)
        if qtype not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"GGUF tensor {t.name} has type {qtype.name}, which mgpu does not read; supported: "
                f"{', '.join(q.name for q in SUPPORTED_TYPES)}"
            )
        name = hf_name(t.name)
        if name is None:
            raise ModelLoadError(
                f"unexpected tensor {t.name!r} in {path.name}: not part of a {arch} model"
            )
        order = None
        if arch in _PERMUTED and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            order = _row_order(int(t.shape.tolist()[-1]), heads)
        out[name] = GGUFTensor(t, order)
    return out


def load_gguf_weights(model: nn.Module, path: Path) -> None:
    """Fill every parameter of ``model`` (one rank's stage and shard) from a GGUF file, strictly.

    Args:
        model: a model built for this rank; it exposes ``checkpoint_names()`` and ``config``.
        path: the ``.gguf`` file.
    """
    reader = open_gguf(path)
    tensors = gguf_tensors(reader, model.config, path)  # type: ignore[arg-type]
    wanted = model.checkpoint_names()  # type: ignore[operator]
    for name, (param, shard) in wanted.items():
        if name not in tensors:
            raise ModelLoadError(f"GGUF file {path.name} is missing the tensor for {name}")
        param.checkpoint_name = f"{tensors[name].name} ({name})"
        param.weight_loader(param, tensors[name], shard)
    finish_loading(model)


def gguf_tokenizer(path: Path) -> Any:
    """A ``transformers`` fast tokenizer rebuilt from the file's ``tokenizer.*`` metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot build a tokenizer from the metadata of {path.name}: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file (by its magic bytes: Ollama's blobs have no suffix)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"
