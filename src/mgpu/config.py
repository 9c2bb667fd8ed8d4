"""Configuration as data: frozen dataclasses validated on creation.

``ModelConfig`` is derived from a Hugging Face ``config.json`` and nothing else: the engine keeps no
hand-written table of model shapes. ``ParallelConfig``, ``CacheConfig`` and ``SchedulerConfig``
describe
how the engine runs it. Each field's docstring (the ``help`` metadata) doubles as CLI help text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mgpu.errors import ConfigError

#: dtype names accepted on the command line and in ``LLM(dtype=...)``.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype, default: torch.dtype = torch.float32) -> torch.dtype:
    """Turn a dtype name (``"bf16"``, ``"float32"``, ``"auto"``) into a ``torch.dtype``.

    ``"auto"`` returns ``default`` (the checkpoint's own ``torch_dtype``).
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return default
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16"
        ) from None


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling from ``config.json``: ``llama3`` (Llama 3.1's long-context ramp) or
    ``linear`` (positions divided by ``factor``, as Gemma 3's global layers use)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, raw: dict[str, Any] | None) -> RopeScaling | None:
        """Parse the HF dict; ``None`` or the default type gives ``None``."""
        if not raw:
            return None
        rope_type = raw.get("rope_type", raw.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type not in ("llama3", "linear"):
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not supported (supported: llama3, linear)"
            )
        return cls(
            rope_type=rope_type,
            factor=float(raw.get("factor", 8.0)),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture numbers of a decoder-only transformer, read from a HF ``config.json``."""

    architecture: str = _help("HF architecture name, e.g. LlamaForCausalLM.")
    hidden_size: int = _help("Width of the residual stream.")
    intermediate_size: int = _help("Width of the MLP (per expert for MoE models).")
    num_hidden_layers: int = _help("Number of decoder layers.")
    num_attention_heads: int = _help("Query heads (total, before tensor parallelism).")
    num_key_value_heads: int = _help("Key/value heads (total); fewer than query heads is GQA/MQA.")
    vocab_size: int = _help("Vocabulary size.")
    head_dim: int = _help("Width of one attention head.")
    max_position_embeddings: int = _help("Longest context the model was trained for.")
    rms_norm_eps: float = _help("Epsilon of RMSNorm.")
    rope_theta: float = _help("RoPE base frequency.")
    rope_scaling: RopeScaling | None = _help("RoPE scaling (llama3) or None.")  # noqa: RUF009
    tie_word_embeddings: bool = _help("LM head shares the embedding matrix.")
    attention_bias: bool = _help("q/k/v projections have a bias (Qwen2).")
    mlp_bias: bool = _help("MLP projections have a bias.")
    torch_dtype: str = _help("Dtype the checkpoint was saved in.")
    num_local_experts: int = _help("MoE experts per layer (0 for a dense model).")
    num_experts_per_tok: int = _help("MoE experts active per token (0 for a dense model).")
    bos_token_id: int | None = _help("Beginning-of-sequence token id.")
    eos_token_ids: tuple[int, ...] = _help("End-of-sequence token ids.")
    sliding_window: int | None = _help("Sliding-window attention width, if the model uses one.")
    hidden_act: str = _help("MLP activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU).", "silu")
    layer_types: tuple[str, ...] = _help(
        "Attention of each layer, sliding_attention or full_attention, when they differ (Gemma); "
        "empty when every layer uses sliding_window (or none does).",
        (),
    )
    rope_local_theta: float | None = _help(
        "RoPE base of the sliding-window layers when it differs from rope_theta (Gemma 3).", None
    )
    query_pre_attn_scalar: float | None = _help(
        "Attention scores are scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 "
        "(Gemma).",
        None,
    )
    attn_logit_softcapping: float | None = _help(
        "Attention scores become cap * tanh(score / cap) before the softmax (Gemma 2).", None
    )
    final_logit_softcapping: float | None = _help(
        "Output logits become cap * tanh(logit / cap) (Gemma 2).", None
    )
    norm_topk_prob: bool = _help(
        "MoE: the top-k routing weights are renormalised to sum to 1 (Mixtral always; Qwen3-MoE "
        "as its config says).",
        True,
    )
    dense_mlp_layers: tuple[int, ...] = _help(
        "MoE: layers whose MLP is dense instead of experts (Qwen3-MoE mlp_only_layers and "
        "decoder_sparse_step).",
        (),
    )
    dense_intermediate_size: int = _help(
        "MoE: width of the dense MLP of the layers in dense_mlp_layers.", 0
    )

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config.json: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def is_moe(self) -> bool:
        """Whether the MLP is a mixture of experts."""
        return self.num_local_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has experts (not a dense MLP)."""
        return self.is_moe and layer not in self.dense_mlp_layers

    def attention_type(self, layer: int) -> str:
        """``sliding_attention`` or ``full_attention`` for decoder layer ``layer``."""
        if self.layer_types:
            return self.layer_types[layer]
        return "full_attention" if self.sliding_window is None else "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        """Sliding-window width of decoder layer ``layer`` (None: it attends to everything)."""
        return self.sliding_window if self.attention_type(layer) == "sliding_attention" else None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from the parsed ``config.json`` of a Hugging Face model."""
        archs = raw.get("architectures") or [raw.get("model_type", "unknown")]
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            # transformers >= 5 writes `rope_parameters` (theta inside); hub checkpoints written by
            # earlier versions have `rope_theta` and `rope_scaling`. Both are read.
            rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
            local_theta = raw.get("rope_local_base_freq")
            if "full_attention" in rope:  # one RoPE per attention type (Gemma 3, transformers 5)
                local_theta = (rope.get("sliding_attention") or {}).get("rope_theta", local_theta)
                rope = rope["full_attention"] or {}
            theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
            use_sliding = raw.get("use_sliding_window", True)
            window = raw.get("sliding_window") if use_sliding else None
            layers = int(raw["num_hidden_layers"])
            experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
            inter = int(raw["intermediate_size"])
            step = int(raw.get("decoder_sparse_step") or 1)
            only_dense = set(raw.get("mlp_only_layers") or [])
            dense_layers = tuple(
                i for i in range(layers) if experts and (i in only_dense or (i + 1) % step)
            )
            return cls(
                architecture=str(archs[0]),
                hidden_size=hidden,
                intermediate_size=int(raw.get("moe_intermediate_size") or inter)
                if experts
                else inter,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                vocab_size=int(raw["vocab_size"]),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=RopeScaling.from_hf(rope),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                num_local_experts=experts,
                num_experts_per_tok=int(raw.get("num_experts_per_tok", 0) or 0),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                sliding_window=int(window) if window else None,
                hidden_act=str(raw.get("hidden_activation") or raw.get("hidden_act") or "silu"),
                layer_types=_layer_types(raw, layers) if window else (),
                rope_local_theta=float(local_theta) if local_theta else None,
                query_pre_attn_scalar=_optional_float(raw.get("query_pre_attn_scalar")),
                attn_logit_softcapping=_optional_float(raw.get("attn_logit_softcapping")),
                final_logit_softcapping=_optional_float(raw.get("final_logit_softcapping")),
                norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
                dense_mlp_layers=dense_layers,
                dense_intermediate_size=inter if dense_layers else 0,
            )
        except KeyError as exc:
            raise ConfigError(f"config.json is missing the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config.json has a malformed field: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (or a model directory containing it)."""
        return cls.from_dict(read_config_json(path))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _layer_types(raw: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """Per-layer attention types of a model with a sliding window; empty when all layers slide.

    transformers >= 5 writes ``layer_types``; older Gemma configs give a pattern instead: Gemma 2
    alternates (even layers slide), Gemma 3 makes every ``sliding_window_pattern``-th layer global.
    """
    types = raw.get("layer_types")
    if types is None:
        pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern")
        if raw.get("model_type") == "gemma2":
            pattern = 2
        if not pattern:
            return ()
        types = [
            "sliding_attention" if (i + 1) % int(pattern) else "full_attention"
            for i in range(num_layers)
        ]
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(
            f"config.json: layer_types must list sliding_attention or full_attention for each of "
            f"the {num_layers} layers, got {types}"
        )
    return () if set(types) == {"sliding_attention"} else tuple(types)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory (or the file itself), with clear errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}: is it a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over ranks: ``world_size = tensor_parallel_size x
    pipeline_parallel_size``.

    Rank layout (TP innermost, as in Megatron/vLLM), worked example with 8 ranks = TP 2 x PP 4::

        pp_rank 0: ranks 0 1   (layers  0..L/4)
        pp_rank 1: ranks 2 3
        pp_rank 2: ranks 4 5
        pp_rank 3: ranks 6 7   (last stage: rank 6 samples and returns tokens)

    ``rank = pp_rank * tp_size + tp_rank``; TP groups are {0,1},{2,3},...; PP groups
    {0,2,4,6},{1,3,5,7}.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    layer_split: tuple[int, ...] | None = None
    #: MoE models: place whole experts on the ranks of the TP group instead of slicing each
    #: expert over them (vLLM's --enable-expert-parallel; see mgpu.layers.moe).
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(
                f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}"
            )
        if self.pipeline_parallel_size < 1:
            raise ConfigError(
                f"--pipeline-parallel-size must be >= 1, got {self.pipeline_parallel_size}"
            )
        if self.layer_split is not None and len(self.layer_split) != self.pipeline_parallel_size:
            raise ConfigError(
                f"--layer-split has {len(self.layer_split)} entries but "
                f"--pipeline-parallel-size is {self.pipeline_parallel_size}"
            )

    @property
    def world_size(self) -> int:
        """Total number of ranks (worker processes)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def check_model(self, model: ModelConfig) -> None:
        """Refuse a layout the model cannot be split into, listing the sizes that work."""
        tp = self.tensor_parallel_size
        devices = tp * self.pipeline_parallel_size
        valid = valid_tp_sizes(model)
        if tp not in valid:
            raise ConfigError(
                f"tensor parallel size {tp} does not divide the model's "
                f"{model.num_attention_heads} attention heads / "
                f"{model.num_key_value_heads} KV heads; "
                f"sizes that work: {', '.join(map(str, valid))}; "
                + (
                    f"for {devices} devices, --pipeline-parallel-size {devices} works"
                    if devices <= model.num_hidden_layers
                    else f"{devices} devices are more than its {model.num_hidden_layers} layers "
                    "can be staged over"
                )
                + " (or leave the layout to --placement auto)"
            )
        if self.enable_expert_parallel and not model.is_moe:
            raise ConfigError(
                f"--enable-expert-parallel places experts on ranks, but {model.architecture} is a "
                "dense model without experts"
            )
        if model.is_moe and not self.enable_expert_parallel and model.intermediate_size % tp:
            raise ConfigError(
                f"tensor parallel size {tp} does not divide the expert width "
                f"{model.intermediate_size}; --enable-expert-parallel places whole experts on "
                "ranks instead"
            )
        pp = self.pipeline_parallel_size
        if pp > model.num_hidden_layers:
            raise ConfigError(
                f"pipeline parallel size {pp} exceeds the model's {model.num_hidden_layers} layers"
            )
        split = self.layer_split
        if split is not None and (sum(split) != model.num_hidden_layers or min(split) < 1):
            raise ConfigError(
                f"--layer-split {','.join(map(str, split))} must be positive and sum "
                f"to the model's {model.num_hidden_layers} layers"
            )

    def layer_range(self, model: ModelConfig, pp_rank: int) -> tuple[int, int]:
        """Half-open ``[start, end)`` layer range of pipeline stage ``pp_rank``."""
        split = self.layer_split or even_layer_split(
            model.num_hidden_layers, self.pipeline_parallel_size
        )
        start = sum(split[:pp_rank])
        return start, start + split[pp_rank]


def even_layer_split(num_layers: int, pp_size: int) -> tuple[int, ...]:
    """Split ``num_layers`` into ``pp_size`` contiguous ranges, the first stages taking the rest."""
    base, extra = divmod(num_layers, pp_size)
    return tuple(base + (1 if i < extra else 0) for i in range(pp_size))


def valid_tp_sizes(model: ModelConfig) -> list[int]:
    """Tensor-parallel sizes the model can be split into.

    Query heads must divide evenly; KV heads either divide evenly or are replicated, which needs the
    TP size to be a multiple of the KV-head count.
    """
    heads, kv = model.num_attention_heads, model.num_key_value_heads
    return [t for t in range(1, heads + 1) if heads % t == 0 and (kv % t == 0 or t % kv == 0)]


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV-cache settings."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    #: CPU only: memory of each rank in bytes (from ``--device-memory``); None: the available RAM.
    rank_memory_bytes: tuple[int, ...] | None = None
    num_blocks_override: int | None = None
    #: Share the KV blocks of equal prompt prefixes between sequences (engine.block_manager).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block size must be a power of two, got {self.block_size}")
        if self.num_blocks_override is not None and self.num_blocks_override < 1:
            raise ConfigError("num_blocks_override must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Number of KV blocks that hold ``num_tokens`` tokens."""
    return math.ceil(num_tokens / block_size)


def cli_flag(name: str) -> str:
    """The ``--flag`` of an :class:`EngineArgs` field: its name with ``_`` turned into ``-``.

    Args:
        name: the field's name.
    """
    return f"--{name.replace('_', '-')}"


def _arg(default: Any, help: str, **cli: Any) -> Any:
    """A settings field: its default, its help (the CLI's too) and argparse extras."""
    return field(default=default, metadata={"help": help, **cli})


#: ``--quantization`` values: mgpu's on-the-fly methods, then vLLM's names of checkpoint formats.
QUANTIZATION_CHOICES = ("int8", "int4", "awq", "gptq", "gguf")

#: vLLM flags mgpu accepts without acting on them, and why (printed once at start-up when set).
IGNORED_BECAUSE = {
    "seed": "sampling seeds are per request (the request's `seed` field)",
    "swap_space": "pre-empted sequences are recomputed, never swapped to CPU memory",
    "kv_cache_dtype": "the KV cache is kept in the model's dtype",
    "disable_log_stats": "mgpu prints no periodic statistics (see /metrics)",
    "disable_log_requests": "mgpu logs requests only at --log-level info",
}


@dataclass(frozen=True)
class EngineArgs:
    """Every engine setting, declared once: the CLI flags and the ``LLM`` keywords come from here.

    Each field's ``help`` becomes its ``--flag`` help (``_`` turned into ``-``), vLLM's names.
    """

    model: str | None = _arg(None, "HF model directory or hub id (default: the bundled demo)")
    tokenizer: str | None = _arg(None, "tokenizer directory or hub id (default: the model's)")
    chat_template: str | None = _arg(
        None, "chat template: a Jinja file or the template itself (default: the tokenizer's)"
    )
    tensor_parallel_size: int | None = _arg(
        None, "ranks each layer is split over (default: --placement auto)", flags=("-tp",)
    )
    pipeline_parallel_size: int | None = _arg(
        None, "pipeline stages (default: --placement auto)", flags=("-pp",)
    )
    layer_split: tuple[int, ...] | None = _arg(
        None, "layers per pipeline stage, e.g. 20,12 (default: even)", type="ints"
    )
    enable_expert_parallel: bool = _arg(
        False, "MoE models: place whole experts on the TP ranks instead of slicing every expert"
    )
    quantization: str | None = _arg(
        None,
        "int8 or int4: weight-only quantization of a float checkpoint while loading; awq, gptq "
        "and gguf (vLLM's names) state the checkpoint's own format, which is read from the "
        "model anyway (docs/quantization.md)",
        choices=QUANTIZATION_CHOICES,
        flags=("-q",),
    )
    device: str | None = _arg(None, "cpu or cuda (default: cuda if any)", choices=("cpu", "cuda"))
    dtype: str = _arg(
        "auto",
        "weights and activations dtype (auto: the checkpoint's)",
        choices=("auto", *DTYPES),
    )
    max_model_len: int | None = _arg(None, "longest prompt + completion (default: the model's)")
    max_num_seqs: int = _arg(64, "most sequences per batch")
    max_num_batched_tokens: int | None = _arg(None, "token budget of one step")
    gpu_memory_utilization: float = _arg(
        0.9, "fraction of each device's memory to use (on CPU: of --device-memory or free RAM)"
    )
    device_memory: str | None = _arg(
        None,
        "CPU only: memory of each device, e.g. 24GiB,12GiB (one entry per rank; a single entry "
        "is the whole engine's budget under a manual layout); default: the available RAM",
    )
    device_speed: str | None = _arg(
        None,
        "relative throughput of each device, e.g. 2,1 (one entry per device, as --device-memory): "
        "an automatic pipeline gives faster devices more layers where their memory allows; "
        "default: on CUDA each GPU's memory bandwidth from the GPU table, on CPU equal",
    )
    placement: str = _arg(
        "auto",
        "auto: build the layout from the devices' memory unless -tp, -pp or --layer-split is "
        "given; manual: one rank unless they are",
        choices=("auto", "manual"),
    )
    block_size: int = _arg(16, "tokens per KV-cache block")
    num_gpu_blocks_override: int | None = _arg(
        None, "fix the KV cache at this many blocks instead of profiling memory"
    )
    cpu_reserved_cores: int | None = _arg(
        None,
        "CPU only: cores kept free for the engine process (default: 1 if every rank still gets "
        "4 cores, else 0 and the workers' OpenMP threads wait passively)",
    )
    compile: bool = _arg(
        False, "compile decode steps with torch.compile: slower start, faster small-model decode"
    )
    enforce_eager: bool = _arg(
        False,
        "turn CUDA graphs off: on CUDA, decode steps replay graphs captured at start-up unless "
        "this is given (vLLM's flag); steps on CPU are always eager",
    )
    max_steps_in_flight: int | None = _arg(
        None,
        "steps outstanding at once (default: the pipeline stages, so every stage works, but 1 "
        "on CPU when no core is left beyond the ranks; 1: one step at a time)",
    )
    async_scheduling: bool = _arg(
        True,
        "schedule step N+1 before step N returns, feeding decoding sequences the tokens step N "
        "samples (the workers fill them in), so workers never wait on the engine between steps; "
        "single-stage layouts (vLLM's flag; --no-async-scheduling runs one step at a time)",
    )
    nnodes: int = _arg(1, "machines the ranks are spread over (torchrun's name)", group="nodes")
    node_rank: int = _arg(0, "this machine's index; 0 serves and schedules", group="nodes")
    master_addr: str = _arg("127.0.0.1", "address of node 0 (the rendezvous)", group="nodes")
    master_port: int = _arg(0, "rendezvous port on node 0 (0: any free, one node)", group="nodes")
    trust_remote_code: bool = _arg(
        False, "refused: mgpu never runs a model's own code", group="vllm"
    )
    seed: int | None = _arg(None, "vLLM's seed (see the start-up line)", group="vllm")
    swap_space: float | None = _arg(
        None, "vLLM's CPU swap in GiB (see the start-up line)", group="vllm"
    )
    kv_cache_dtype: str = _arg("auto", "vLLM's KV-cache dtype (auto only)", group="vllm")
    enable_prefix_caching: bool = _arg(
        True,
        "share the KV cache of equal prompt prefixes between requests (vLLM's automatic prefix "
        "caching; --no-enable-prefix-caching turns it off)",
    )
    enable_lora: bool = _arg(
        False, "serve LoRA adapters (--lora-modules) beside the base model", group="lora"
    )
    lora_modules: tuple[str, ...] | None = _arg(
        None,
        'adapters to serve, each name=DIR or JSON {"name": ..., "path": ...} (vLLM\'s forms): '
        "a PEFT directory (adapter_config.json, adapter_model.safetensors) served under its name "
        "in /v1/models and picked by a request's model field",
        group="lora",
        nargs="+",
    )
    max_loras: int = _arg(
        1,
        "adapters one batch may use at once: the LoRA slots held on each device (requests for "
        "other adapters wait for a later step)",
        group="lora",
    )
    max_lora_rank: int = _arg(
        16,
        "rank of every LoRA slot (bounds their memory); an adapter of a higher rank is refused "
        "at start",
        group="lora",
    )
    disable_log_stats: bool = _arg(False, "vLLM's flag (see the start-up line)", group="vllm")
    disable_log_requests: bool = _arg(False, "vLLM's flag (see the start-up line)", group="vllm")

    def __post_init__(self) -> None:
        if self.trust_remote_code:
            raise ConfigError(
                "--trust-remote-code is refused: mgpu never runs code shipped with a model; it "
                "builds supported architectures from config.json and safetensors weights only"
            )
        split = self.layer_split
        if isinstance(split, str):
            try:
                split = tuple(int(x) for x in split.split(","))
            except ValueError:
                raise ConfigError(
                    f"--layer-split takes integers like 20,12, got {split!r}"
                ) from None
        if split is not None:
            object.__setattr__(self, "layer_split", tuple(split))
        modules = self.lora_modules
        if isinstance(modules, str):
            modules = (modules,)
        if modules is not None:
            object.__setattr__(self, "lora_modules", tuple(modules))

    @classmethod
    def add_cli_args(cls, parser: Any) -> None:
        """Add one flag per field to an ``argparse`` parser, in groups.

        Args:
            parser: the subcommand's parser.
        """
        import argparse
        import dataclasses

        titles = {
            "engine": "model and layout",
            "nodes": "multi-node (every node runs the same command)",
            "lora": "LoRA adapters (docs/serving.md)",
            "vllm": "vLLM compatibility",
        }
        groups = {key: parser.add_argument_group(title) for key, title in titles.items()}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            names = [cli_flag(f.name), *meta.get("flags", ())]
            group = groups[meta.get("group", "engine")]
            if isinstance(f.default, bool):
                # A switch that is on by default also gets its --no-... form (vLLM's).
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                group.add_argument(
                    *names, dest=f.name, action=action, default=f.default, help=meta["help"]
                )
                continue
            kind = meta.get("type")
            convert: Any = str if kind == "ints" else _value_type(f.default, f.type)
            group.add_argument(
                *names,
                dest=f.name,
                type=convert,
                default=f.default,
                choices=meta.get("choices"),
                nargs=meta.get("nargs"),
                help=meta["help"],
            )

    def to_cli_args(self, include: tuple[str, ...] = ()) -> list[str]:
        """The command-line arguments that give these settings, under the flags
        :meth:`add_cli_args` defines: each field that differs from its default (and each named in
        ``include``), in field order. Printed commands are built with it, so a renamed field
        renames the printed flag too.

        Args:
            include: fields to write even at their default value.
        """
        import dataclasses

        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (value == f.default and f.name not in include):
                continue
            flag = cli_flag(f.name)
            if isinstance(f.default, bool):
                if value != f.default:  # --x for a switch that is off by default, else --no-x
                    out.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, tuple):
                out += [flag, ",".join(map(str, value))]
            else:
                out += [flag, str(value)]
        return out

    @classmethod
    def from_cli_args(cls, args: Any) -> EngineArgs:
        """The settings of a parsed ``argparse`` namespace (fields it lacks keep their default)."""
        import dataclasses

        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~mgpu.engine.llm_engine.LLMEngine` (all but ``model``)."""
        return {
            "tokenizer": self.tokenizer,
            "chat_template": self.chat_template,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "layer_split": self.layer_split,
            "enable_expert_parallel": self.enable_expert_parallel,
            "quantization": self.quantization,
            "device": self.device,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "device_memory": self.device_memory,
            "device_speed": self.device_speed,
            "placement": self.placement,
            "block_size": self.block_size,
            "num_blocks": self.num_gpu_blocks_override,
            "cpu_reserved_cores": self.cpu_reserved_cores,
            "compile_decode": self.compile,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching,
            "max_steps_in_flight": self.max_steps_in_flight,
            "async_scheduling": self.async_scheduling,
            "nnodes": self.nnodes,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "enable_lora": self.enable_lora,
            "lora_modules": self.lora_modules,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
        }

    def ignored(self) -> str | None:
        """One line naming each vLLM flag given that mgpu does not act on, and why."""
        import dataclasses

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        parts = []
        for name, why in IGNORED_BECAUSE.items():
            value = getattr(self, name)
            if value != defaults[name] and not (name == "kv_cache_dtype" and value == "auto"):
                parts.append(f"{cli_flag(name)} ({why})")
        return "ignored: " + "; ".join(parts) if parts else None


def _value_type(default: Any, annotation: Any) -> Any:
    """The argparse ``type`` of a field, from its default or its annotation string."""
    text = str(annotation)
    if isinstance(default, float) or text.startswith("float"):
        return float
    if isinstance(default, int) or text.startswith("int"):
        return int
    return str
