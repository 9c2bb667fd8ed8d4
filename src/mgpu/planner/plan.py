"""``plan()``: does a model fit these GPUs, how should it be split, and how fast will it run.

The planner enumerates every layout the engine can run on the given GPUs (one GPU, tensor
parallel, pipeline or layer split, TP x PP, on the largest 1..N GPUs), sizes each GPU's memory with
:mod:`mgpu.memory` and each layout's speed with the calibrated model of :mod:`mgpu.planner.speed`,
and keeps the fastest layout that fits, preferring fewer GPUs when more would add less than
:data:`MORE_GPUS_MIN_GAIN`. When nothing fits it reports the closest attempt and the smallest
configuration that would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mgpu.config import valid_tp_sizes
from mgpu.errors import ConfigError
from mgpu.memory import stored_bits_per_weight
from mgpu.planner.calibration import Calibration, load_calibration
from mgpu.planner.commands import (
    CommandInputs,
    llama_cpp_command,
    mgpu_command,
    mgpu_refusal,
    vllm_command,
)
from mgpu.planner.engines import (
    CALIBRATION_PARENT,
    ENGINES,
    EXPERT,
    LAYER_SPLIT,
    PIPELINE,
    SINGLE,
    TENSOR,
    TENSOR_PIPELINE,
    EngineProfile,
    get_engine,
)
from mgpu.planner.hardware import (
    Device,
    Interconnect,
    detect_gpus,
    gpu_catalogue,
    make_interconnect,
    parse_gpus,
)
from mgpu.planner.models import ModelSpec, load_model
from mgpu.planner.placement import GIB, Layout, RankMemory, Workload, make_layout, rank_memory
from mgpu.planner.power import PowerPlan, power_plan
from mgpu.planner.quant import QuantFormat, file_format, kv_cache_bytes, parse_quantization
from mgpu.planner.speed import (
    SpeedConstants,
    has_bandwidth,
    peak_tflops,
    round_seconds,
    step_cost,
    step_seconds,
)

DEFAULT_CONTEXT = 4096
#: A layout on more GPUs must be this much faster to be chosen over one on fewer.
MORE_GPUS_MIN_GAIN = 0.05
#: Largest GPU count the "smallest configuration that would fit" search tries.
MAX_SEARCH_GPUS = 64
PARALLELISMS = ("auto", "single", "tp", "pp", "layer-split", "ep")
#: Precisions tried, highest first, when suggesting one that would fit.
_FALLBACK_PRECISIONS = (
    "fp8",
    "int8",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q4_k_m",
    "awq-int4",
    "exl2-4.0",
    "q3_k_m",
    "exl2-3.0",
    "q2_k",
)


@dataclass(frozen=True)
class Range:
    """A prediction with its low-high range (None where it cannot be predicted)."""

    low: float | None
    expected: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | None]:
        """JSON form, rounded to 0.1."""
        return {
            "low": _round(self.low, 1),
            "expected": _round(self.expected, 1),
            "high": _round(self.high, 1),
        }


_UNKNOWN = Range(None, None, None)


@dataclass(frozen=True)
class DevicePlan:
    """One GPU's share of the plan, in GiB."""

    index: int
    name: str
    memory_total_gb: float
    weights_gb: float
    kv_cache_gb: float
    activations_gb: float
    overhead_gb: float
    kv_bytes_per_token: int
    used: bool
    tp_rank: int | None = None
    pp_rank: int | None = None
    layers: tuple[int, int] | None = None

    @property
    def required_gb(self) -> float:
        """Everything the GPU holds."""
        return self.weights_gb + self.kv_cache_gb + self.activations_gb + self.overhead_gb

    @property
    def free_gb(self) -> float:
        """Memory left (negative when it does not fit)."""
        return self.memory_total_gb - self.required_gb

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "index": self.index,
            "name": self.name,
            "memory_total_gb": round(self.memory_total_gb, 2),
            "weights_gb": round(self.weights_gb, 2),
            "kv_cache_gb": round(self.kv_cache_gb, 2),
            "activations_gb": round(self.activations_gb, 2),
            "overhead_gb": round(self.overhead_gb, 2),
            "free_gb": round(self.free_gb, 2),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "used": self.used,
            "tp_rank": self.tp_rank,
            "pp_rank": self.pp_rank,
            "layers": list(self.layers) if self.layers else None,
        }


@dataclass(frozen=True)
class Candidate:
    """One evaluated layout."""

    layout: Layout
    ranks: tuple[RankMemory, ...]
    decode: Range
    prefill: Range
    throughput: float | None
    single_gpu_decode: float | None

    @property
    def fits(self) -> bool:
        """Every GPU holds its share."""
        return all(r.free >= 0 for r in self.ranks)

    @property
    def shortfall_gib(self) -> float:
        """The largest deficit of any GPU (0 when it fits)."""
        return max(0.0, max(-r.free for r in self.ranks) / GIB)

    @property
    def world(self) -> int:
        """GPUs used."""
        return self.layout.tp * self.layout.pp

    def label(self) -> str:
        """E.g. ``tensor_parallel tp=2 on 2x GeForce RTX 4090``."""
        layout = self.layout
        return f"{layout.strategy} tp={layout.tp} pp={layout.pp} on {_gpus_text(layout.devices)}"


@dataclass(frozen=True)
class Plan:
    """A plan for running one model on a set of GPUs: see docs/planner.md for the JSON contract."""

    model: str
    model_source: str
    quantization: str
    bits_per_weight: float
    engine: str
    gpus: tuple[str, ...]
    interconnect: str
    context: int
    concurrency: int
    kv_cache_dtype: str
    fits: bool
    strategy: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    layer_split: tuple[int, ...]
    devices: tuple[DevicePlan, ...]
    decode_tokens_per_s: Range
    prefill_tokens_per_s: Range
    throughput_tokens_per_s: float | None
    tp_scaling_efficiency: float | None
    power: PowerPlan
    commands: dict[str, str]
    reasons: tuple[str, ...]
    minimum_fit: str | None = None
    alternatives: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def psu_watts(self) -> int | None:
        """Power supply to buy."""
        return self.power.psu_watts

    @property
    def memory_required_gb(self) -> float:
        """Memory needed over all used GPUs."""
        return sum(d.required_gb for d in self.devices if d.used)

    @property
    def margin_gb(self) -> float:
        """Smallest free memory over the used GPUs (negative: the shortfall)."""
        return min(d.free_gb for d in self.devices if d.used)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract (docs/planner.md)."""
        return {
            "fits": self.fits,
            "strategy": self.strategy,
            "devices": [d.to_dict() for d in self.devices],
            "decode_tokens_per_s": self.decode_tokens_per_s.to_dict(),
            "prefill_tokens_per_s": self.prefill_tokens_per_s.to_dict(),
            "throughput_tokens_per_s": _round(self.throughput_tokens_per_s, 1),
            "psu_watts": self.psu_watts,
            "commands": dict(self.commands),
            "reasons": list(self.reasons),
            "model": self.model,
            "model_source": self.model_source,
            "quantization": self.quantization,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "engine": self.engine,
            "gpus": list(self.gpus),
            "interconnect": self.interconnect,
            "context": self.context,
            "concurrency": self.concurrency,
            "kv_cache_dtype": self.kv_cache_dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "layer_split": list(self.layer_split),
            "memory_required_gb": round(self.memory_required_gb, 2),
            "margin_gb": round(self.margin_gb, 2),
            "tp_scaling_efficiency": _round(self.tp_scaling_efficiency, 3),
            "gpu_watts": self.power.gpu_watts,
            "system_watts": self.power.system_watts,
            "power_and_cooling": list(self.power.notes),
            "minimum_fit": self.minimum_fit,
            "alternatives": list(self.alternatives),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _gpus_text(devices: tuple[Device, ...] | list[Device]) -> str:
    groups: dict[str, int] = {}
    for device in devices:
        groups[device.name] = groups.get(device.name, 0) + 1
    return " + ".join(f"{n}x {name}" for name, n in groups.items())


@dataclass(frozen=True)
class _Context:
    """Everything fixed for one planning question."""

    model: ModelSpec
    fmt: QuantFormat
    bits: float
    engine: EngineProfile
    link: Interconnect
    workload: Workload
    calibration: Calibration
    constants: SpeedConstants


def _evaluate(ctx: _Context, layout: Layout) -> Candidate:
    """Size the memory and predict the speed of one layout."""
    config = ctx.model.config
    ranks = tuple(rank_memory(config, ctx.bits, ctx.engine, layout, ctx.workload))
    context = ctx.workload.context
    kv = ctx.workload.kv_bytes_per_element

    if not has_bandwidth(layout):
        return Candidate(layout, ranks, _UNKNOWN, _UNKNOWN, None, None)

    def decode_at(position: int, lay: Layout = layout) -> float:
        cost = step_cost(config, ctx.bits, ctx.engine, lay, ctx.link, 1, position, kv)
        return 1.0 / step_seconds(cost, ctx.constants)

    low_rate, high_rate = ctx.calibration.decode_range
    empty = step_cost(config, ctx.bits, ctx.engine, layout, ctx.link, 1, 0, kv)
    # Nothing reads faster than every byte at full bandwidth with no overhead at all.
    roofline = 1.0 / empty.memory_s
    decode = Range(
        decode_at(context) * low_rate,
        decode_at(context // 2),
        min(roofline, 1.0 / step_seconds(empty, ctx.constants) * high_rate),
    )

    chunk = ctx.engine.prefill_chunk_tokens
    prompt = step_cost(config, ctx.bits, ctx.engine, layout, ctx.link, 1, 0, kv, new_tokens=chunk)
    prefill_rate = chunk / step_seconds(prompt, ctx.constants)
    low_p, high_p = ctx.calibration.prefill_range
    prefill = Range(prefill_rate * low_p, prefill_rate, prefill_rate * high_p)

    batch = ctx.workload.concurrency
    pipelined = layout.strategy in (PIPELINE, TENSOR_PIPELINE) and batch >= layout.pp
    micro = math.ceil(batch / layout.pp) if pipelined else batch
    step = step_cost(config, ctx.bits, ctx.engine, layout, ctx.link, micro, context // 2, kv)
    throughput = batch / round_seconds(step, ctx.constants, pipelined)

    first = layout.devices[0]
    alone = Layout(SINGLE, 1, 1, (config.num_hidden_layers,), (first,))
    return Candidate(layout, ranks, decode, prefill, throughput, decode_at(context // 2, alone))


def _layouts(
    ctx: _Context,
    devices: list[Device],
    parallelism: str,
    tp_size: int | None,
    pp_size: int | None,
    all_devices: bool = False,
) -> list[Layout]:
    """Every layout to consider, on the largest 1..N of ``devices`` (N only: ``all_devices``)."""
    engine, config = ctx.engine, ctx.model.config
    ordered = sorted(devices, key=lambda d: (-d.memory_gib, -(d.spec.bandwidth_gbs or 0.0)))
    valid_tp = set(valid_tp_sizes(config))
    split = engine.split_strategy
    if tp_size is not None or pp_size is not None:
        tp, pp = tp_size or 1, pp_size or 1
        if tp == 1 and pp == 1:
            strategy = SINGLE
        elif pp == 1:
            strategy = EXPERT if parallelism == "ep" else TENSOR
        else:
            strategy = split if tp == 1 else TENSOR_PIPELINE
        return [
            make_layout(
                strategy, ordered[: tp * pp], tp, pp, config, ctx.bits, engine, ctx.workload
            )
        ]

    layouts = []
    counts = [1] if parallelism == "single" else range(1, len(ordered) + 1)
    if all_devices:
        counts = [len(ordered)]
    for count in counts:
        subset = ordered[:count]
        options: list[tuple[str, int, int]] = []
        if count == 1 and parallelism in ("auto", "single"):
            options.append((SINGLE, 1, 1))
        if count > 1 and parallelism in ("auto", "tp") and count in valid_tp:
            options.append((TENSOR, count, 1))
        if count > 1 and parallelism in ("auto", "pp", "layer-split"):
            options.append((split, 1, count))
        if (
            count > 1
            and parallelism in ("auto", "ep")
            and count in valid_tp
            and config.is_moe
            and config.num_local_experts % count == 0
        ):
            options.append((EXPERT, count, 1))
        if count > 2 and parallelism == "auto" and TENSOR_PIPELINE in engine.strategies:
            for tp in range(2, count):
                if count % tp == 0 and tp in valid_tp:
                    options.append((TENSOR_PIPELINE, tp, count // tp))
        for strategy, tp, pp in options:
            if strategy in engine.strategies and pp <= config.num_hidden_layers:
                layouts.append(
                    make_layout(strategy, subset, tp, pp, config, ctx.bits, engine, ctx.workload)
                )
    return layouts


def _objective(candidate: Candidate, concurrency: int) -> float:
    value = candidate.decode.expected if concurrency == 1 else candidate.throughput
    return value or 0.0


def _choose(candidates: list[Candidate], concurrency: int) -> Candidate:
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        most = max(c.world for c in candidates)
        return min((c for c in candidates if c.world == most), key=lambda c: c.shortfall_gib)
    best = max(_objective(c, concurrency) for c in fitting)
    good = [c for c in fitting if _objective(c, concurrency) >= (1 - MORE_GPUS_MIN_GAIN) * best]
    return min(good, key=lambda c: (c.world, -_objective(c, concurrency)))


def _check_request(
    ctx: _Context,
    devices: list[Device],
    parallelism: str,
    tp_size: int | None,
    pp_size: int | None,
) -> None:
    """Refuse requests that cannot be planned, saying why."""
    engine, config = ctx.engine, ctx.model.config
    if ctx.fmt.family not in engine.families:
        able = [name for name, e in ENGINES.items() if ctx.fmt.family in e.families]
        raise ConfigError(
            f"{engine.name} cannot run {ctx.fmt.name} weights; engines that can: {', '.join(able)}"
        )
    if parallelism not in PARALLELISMS:
        raise ConfigError(
            f"unknown --parallelism {parallelism!r}; use one of {', '.join(PARALLELISMS)}"
        )
    wanted = {
        "tp": TENSOR,
        "pp": engine.split_strategy,
        "layer-split": engine.split_strategy,
        "ep": EXPERT,
    }
    if parallelism in wanted and wanted[parallelism] not in engine.strategies:
        raise ConfigError(
            f"{engine.name} has no {parallelism} mode; it offers {', '.join(engine.strategies)}"
        )
    if parallelism in wanted and len(devices) < 2 and tp_size is None and pp_size is None:
        raise ConfigError(f"--parallelism {parallelism} needs at least two GPUs in --gpus")
    if parallelism == "ep" and not config.is_moe:
        raise ConfigError(
            f"--parallelism ep places experts on GPUs; {ctx.model.name} is not a mixture of experts"
        )
    if tp_size is not None or pp_size is not None:
        tp = 1 if tp_size is None else tp_size
        pp = 1 if pp_size is None else pp_size
        if tp < 1 or pp < 1:
            raise ConfigError("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
        consistent = {
            "auto": True,
            "single": tp == pp == 1,
            "tp": tp > 1 and pp == 1,
            "pp": tp == 1 and pp > 1,
            "layer-split": tp == 1 and pp > 1,
            "ep": tp > 1 and pp == 1 and config.num_local_experts % tp == 0,
        }
        if not consistent[parallelism]:
            raise ConfigError(
                f"--parallelism {parallelism} contradicts --tensor-parallel-size {tp} "
                f"--pipeline-parallel-size {pp}; give the sizes or a --parallelism that matches"
            )
        if tp not in valid_tp_sizes(config):
            raise ConfigError(
                f"tensor parallel size {tp} does not divide {ctx.model.name}'s "
                f"{config.num_attention_heads} attention heads / {config.num_key_value_heads} KV "
                f"heads; sizes that work: {', '.join(map(str, valid_tp_sizes(config)))}"
            )
        if tp * pp > len(devices):
            raise ConfigError(
                f"tensor x pipeline parallel size {tp} x {pp} needs {tp * pp} GPUs, "
                f"but --gpus lists {len(devices)}"
            )
        if pp > config.num_hidden_layers:
            raise ConfigError(
                f"pipeline parallel size {pp} exceeds {ctx.model.name}'s "
                f"{config.num_hidden_layers} layers"
            )
        if tp > 1 and TENSOR not in engine.strategies:
            raise ConfigError(f"{engine.name} has no tensor parallelism")
        if pp > 1 and engine.split_strategy not in engine.strategies:
            raise ConfigError(f"{engine.name} cannot split layers over GPUs")
        if tp > 1 and pp > 1 and TENSOR_PIPELINE not in engine.strategies:
            raise ConfigError(
                f"{engine.name} cannot combine tensor and pipeline parallelism; "
                "give only one of the two sizes"
            )


def _kv_element_bytes(kv_cache_dtype: str, fmt: QuantFormat) -> float:
    """``auto`` keeps the KV cache in the compute dtype: 32-bit for an f32 model, else 16-bit."""
    if kv_cache_dtype == "auto" and fmt.name == "f32":
        return 4.0
    return kv_cache_bytes(kv_cache_dtype)


def _default_precision(model: ModelSpec) -> str:
    if model.implied_quantization:
        return model.implied_quantization
    dtype = model.config.torch_dtype.lower()
    return {"float16": "f16", "float32": "f32"}.get(dtype, "bf16")


def plan(
    model: str | ModelSpec,
    gpus: str | list[Device] | None = None,
    *,
    quantization: str | None = None,
    engine: str = "mgpu",
    context: int | None = None,
    concurrency: int = 1,
    parallelism: str = "auto",
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    interconnect: str | None = None,
    kv_cache_dtype: str = "auto",
    calibration: Calibration | None = None,
) -> Plan:
    """Plan how to run ``model`` on ``gpus``.

    Args:
        model: a catalogue name, a Hugging Face model directory, a ``.gguf`` file, or a loaded spec.
        gpus: ``--gpus`` text (``2x RTX 4090``), devices, or None to detect them through NVML.
        quantization: weight precision; by default the one the model's name or files imply, else
            its checkpoint dtype.
        engine: whose speed to predict (``mgpu``, ``llama.cpp``, ``vllm``, ...).
        context: tokens per sequence the KV cache must hold, at most the model's own context;
            by default :data:`DEFAULT_CONTEXT` or the model's context if that is shorter.
        concurrency: sequences served at once.
        parallelism: ``auto`` (the fastest layout that fits), ``single``, ``tp``, ``pp`` or
            ``layer-split``.
        tensor_parallel_size: force this TP size.
        pipeline_parallel_size: force this many pipeline stages.
        interconnect: ``pcie3``, ``pcie4``, ``pcie4-x8``, ``pcie5`` or ``nvlink``; by default the
            GPUs' own link.
        kv_cache_dtype: ``auto`` (the compute dtype: 16-bit, or 32-bit for f32 weights), ``f16``,
            ``fp8``, ``q8_0`` or ``q4_0``.
        calibration: speed constants; the packaged calibration by default.

    Raises:
        ConfigError: for unknown names and impossible requests, saying what to do.
    """
    if (context is not None and context < 1) or concurrency < 1:
        raise ConfigError("--context and --concurrency must be positive")
    spec = load_model(model) if isinstance(model, str) else model
    notes: list[str] = list(spec.notes)
    limit = spec.config.max_position_embeddings
    if context is None:
        context = min(DEFAULT_CONTEXT, limit)
        if context < DEFAULT_CONTEXT:
            notes.append(f"Context {context} tokens: the model's own (shorter than the default).")
    elif context > limit:
        raise ConfigError(
            f"--context {context} exceeds {spec.name}'s context of {limit} tokens "
            "(max_position_embeddings); engines refuse a longer --max-model-len"
        )
    if gpus is None:
        devices = detect_gpus()
        if not devices:
            raise ConfigError(
                "no --gpus given and no NVIDIA GPU detected (NVML); pass e.g. --gpus '2x RTX 4090'"
            )
        notes.append(f"GPUs detected through NVML: {_gpus_text(devices)}.")
    elif isinstance(gpus, str):
        devices, gpu_notes = parse_gpus(gpus)
        notes += [f"{n}." for n in gpu_notes]
    else:
        # Fresh objects: GPUs are told apart by identity, so one Device listed twice is two GPUs.
        devices = [Device(d.spec, d.memory_gib) for d in gpus]
    if quantization is None and spec.is_gguf_file and spec.file_bits_per_weight:
        fmt = file_format(_default_precision(spec), spec.file_bits_per_weight)
    else:
        fmt = parse_quantization(quantization or _default_precision(spec))
    bits = fmt.bits_per_weight
    if spec.is_gguf_file and spec.file_bits_per_weight:
        if fmt.name == spec.implied_quantization or quantization is None:
            bits = spec.file_bits_per_weight
            notes.append(
                f"{spec.name}.gguf holds {bits:.2f} bits per weight (from its tensor table)."
            )
        else:
            notes.append(
                f"The file is {spec.implied_quantization}; the plan is for {fmt.name}, "
                "which needs a different file."
            )
    engine_profile = get_engine(engine)
    stored = _engine_bits(engine_profile, fmt, bits, spec.config.hidden_size)
    if fmt.family == "gguf" and stored > bits + 0.01:
        notes.append(
            f"mgpu stores {fmt.name} at {stored:.2f} bits per weight once loaded (its blocks "
            f"become int4 groups of 32 and int8 rows), not the file's {bits:.2f}; "
            "--quantization int4 from the Hugging Face checkpoint stores 4.25."
        )
    bits = stored
    link = make_interconnect(interconnect, devices)
    calibration = calibration or load_calibration()
    ctx = _Context(
        model=spec,
        fmt=fmt,
        bits=bits,
        engine=engine_profile,
        link=link,
        workload=Workload(context, concurrency, _kv_element_bytes(kv_cache_dtype, fmt)),
        calibration=calibration,
        constants=calibration.constants(engine_profile.name, fmt.family),
    )
    _check_request(ctx, devices, parallelism, tensor_parallel_size, pipeline_parallel_size)
    candidates = [
        _evaluate(ctx, layout)
        for layout in _layouts(
            ctx, devices, parallelism, tensor_parallel_size, pipeline_parallel_size
        )
    ]
    chosen = _choose(candidates, concurrency)
    minimum = None if chosen.fits else _minimum_fit(ctx, devices)
    reasons = _reasons(ctx, devices, candidates, chosen, minimum, quantization is None) + notes
    return _assemble(ctx, devices, candidates, chosen, minimum, reasons, kv_cache_dtype)


def _device_plans(devices: list[Device], chosen: Candidate) -> tuple[DevicePlan, ...]:
    """Every listed GPU in its --gpus order; the unused ones with nothing on them."""
    by_identity = {id(r.device): r for r in chosen.ranks}
    plans = []
    for index, device in enumerate(devices):
        rank = by_identity.get(id(device))
        if rank is None:
            plans.append(DevicePlan(index, device.name, device.memory_gib, 0, 0, 0, 0, 0, False))
            continue
        plans.append(
            DevicePlan(
                index=index,
                name=device.name,
                memory_total_gb=device.memory_gib,
                weights_gb=rank.weights / GIB,
                kv_cache_gb=rank.kv_cache / GIB,
                activations_gb=rank.activations / GIB,
                overhead_gb=rank.overhead / GIB,
                kv_bytes_per_token=rank.kv_bytes_per_token,
                used=True,
                tp_rank=rank.tp_rank,
                pp_rank=rank.pp_rank,
                layers=rank.layers,
            )
        )
    return tuple(plans)


def _assemble(
    ctx: _Context,
    devices: list[Device],
    candidates: list[Candidate],
    chosen: Candidate,
    minimum: str | None,
    reasons: list[str],
    kv_cache_dtype: str,
) -> Plan:
    layout = chosen.layout
    device_plans = _device_plans(devices, chosen)
    fraction = max(r.required / (r.device.memory_gib * GIB) for r in chosen.ranks)
    inputs = CommandInputs(
        model=ctx.model,
        fmt=ctx.fmt,
        strategy=layout.strategy,
        tp=layout.tp,
        pp=layout.pp,
        layer_split=layout.layer_split,
        device_indices=_rank_indices(devices, layout),
        all_devices=len(devices),
        context=ctx.workload.context,
        concurrency=ctx.workload.concurrency,
        kv_cache_dtype=kv_cache_dtype,
        memory_fraction=fraction,
        fits=chosen.fits,
    )
    commands = {
        "mgpu": mgpu_command(inputs),
        "vllm": vllm_command(inputs),
        "llama.cpp": llama_cpp_command(inputs),
    }
    refusal = mgpu_refusal(inputs)
    if refusal is not None:
        reasons = [
            *reasons,
            f"No mgpu serve command: {refusal}. The vLLM and llama.cpp "
            "commands run the same layout.",
        ]
    tp_efficiency = None
    if layout.tp > 1 and chosen.decode.expected and chosen.single_gpu_decode:
        tp_efficiency = chosen.decode.expected / chosen.single_gpu_decode / layout.tp
    alternatives = tuple(
        {
            "strategy": c.layout.strategy,
            "gpus": _gpus_text(c.layout.devices),
            "tensor_parallel_size": c.layout.tp,
            "pipeline_parallel_size": c.layout.pp,
            "fits": c.fits,
            "shortfall_gb": round(c.shortfall_gib, 2),
            "decode_tokens_per_s": _round(c.decode.expected, 1),
            "throughput_tokens_per_s": _round(c.throughput, 1),
        }
        for c in candidates
    )
    return Plan(
        model=ctx.model.name,
        model_source=ctx.model.source,
        quantization=ctx.fmt.name,
        bits_per_weight=ctx.bits,
        engine=ctx.engine.name,
        gpus=tuple(d.name for d in devices),
        interconnect=ctx.link.name,
        context=ctx.workload.context,
        concurrency=ctx.workload.concurrency,
        kv_cache_dtype=kv_cache_dtype,
        fits=chosen.fits,
        strategy=layout.strategy,
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        layer_split=layout.layer_split,
        devices=device_plans,
        decode_tokens_per_s=chosen.decode,
        prefill_tokens_per_s=chosen.prefill,
        throughput_tokens_per_s=chosen.throughput,
        tp_scaling_efficiency=tp_efficiency,
        power=power_plan(list(layout.devices)),
        commands=commands,
        reasons=tuple(reasons),
        minimum_fit=minimum,
        alternatives=alternatives,
    )


def _rank_indices(devices: list[Device], layout: Layout) -> tuple[int, ...]:
    """--gpus positions of the layout's GPUs in rank order (for CUDA_VISIBLE_DEVICES)."""
    positions = {id(d): i for i, d in enumerate(devices)}
    return tuple(positions[id(d)] for d in layout.devices)


def _fits_with(ctx: _Context, devices: list[Device]) -> Candidate | None:
    """The best fitting layout on exactly ``devices``, or None."""
    layouts = _layouts(ctx, devices, "auto", None, None, all_devices=True)
    fitting = [c for c in (_evaluate(ctx, layout) for layout in layouts) if c.fits]
    return max(fitting, key=lambda c: _objective(c, ctx.workload.concurrency)) if fitting else None


def _minimum_fit(ctx: _Context, devices: list[Device]) -> str | None:
    """The fewest GPUs of the largest listed kind that would hold the model, and the smallest single
    catalogue GPU that would."""
    largest = max(devices, key=lambda d: d.memory_gib)
    config_bytes = sum(r.required for r in _evaluate(ctx, _single(ctx, largest)).ranks)
    # Memory alone gives a lower bound on the count; start the search there.
    start = max(len(devices) + 1, math.ceil(config_bytes / (largest.memory_gib * GIB)))
    answer = None
    for count in range(start, MAX_SEARCH_GPUS + 1):
        group = [Device(largest.spec, largest.memory_gib) for _ in range(count)]
        found = _fits_with(ctx, group)
        if found is not None:
            answer = f"{count}x {largest.name} ({found.layout.strategy})"
            break
    singles = sorted(
        (g for g in gpu_catalogue() if g.bandwidth_gbs and g.memory_gib > largest.memory_gib),
        key=lambda g: g.memory_gib,
    )
    for spec in singles:
        if _evaluate(ctx, _single(ctx, Device(spec, spec.memory_gib))).fits:
            single = f"1x {spec.name}"
            return f"{answer} or {single}" if answer else single
    return answer


def _single(ctx: _Context, device: Device) -> Layout:
    return Layout(SINGLE, 1, 1, (ctx.model.config.num_hidden_layers,), (device,))


def _reasons(
    ctx: _Context,
    devices: list[Device],
    candidates: list[Candidate],
    chosen: Candidate,
    minimum: str | None,
    precision_was_default: bool,
) -> list[str]:
    """Why this plan: the sizes, why one or several GPUs, why this strategy and not another."""
    config = ctx.model.config
    reasons = []
    weights_gib = sum(r.weights for r in chosen.ranks) / GIB
    kv_total = sum(r.kv_cache for r in chosen.ranks) / GIB
    per_token = sum(r.kv_bytes_per_token for r in chosen.ranks)
    reasons.append(
        f"{ctx.model.name} at {ctx.fmt.name} ({ctx.bits:.2f} bits/weight) is {weights_gib:.1f} GiB "
        f"of weights; the KV cache for {ctx.workload.concurrency} x {ctx.workload.context} tokens "
        f"adds {kv_total:.2f} GiB ({per_token / 2**20:.3f} MiB per token)."
    )
    largest = max(devices, key=lambda d: d.memory_gib)
    alone = _evaluate(ctx, _single(ctx, largest))
    need = sum(r.required for r in alone.ranks) / GIB
    if alone.fits:
        reasons.append(
            f"It fits one {largest.name} ({need:.1f} of {largest.memory_gib:g} GiB), so more GPUs "
            "are optional: they can only add speed or room for context and concurrency."
        )
    else:
        reasons.append(
            f"It needs {need:.1f} GiB on one GPU but a {largest.name} has {largest.memory_gib:g} "
            "GiB, so it needs several GPUs."
        )
    if chosen.fits:
        reasons.append(_why_layout(ctx, candidates, chosen))
    else:
        reasons.append(
            f"It does not fit {_gpus_text(devices)}: the closest layout ({chosen.layout.strategy}) "
            f"is {chosen.shortfall_gib:.1f} GiB short on its fullest GPU."
        )
        if minimum:
            reasons.append(f"Smallest configuration that would fit: {minimum}.")
        lighter = _lighter_precision(ctx, devices)
        if lighter:
            reasons.append(lighter)
        if ctx.workload.context > 2048 or ctx.workload.concurrency > 1:
            smaller_kv = (
                " or --kv-cache-dtype fp8" if ctx.workload.kv_bytes_per_element >= 2 else ""
            )
            reasons.append(
                f"A shorter --context, fewer --concurrency{smaller_kv} shrinks the KV cache."
            )
        reasons.append("Speeds are those of the closest layout as if it had the memory.")
    if chosen.fits and chosen.layout.strategy == EXPERT and chosen.decode.expected:
        reasons.append(_expert_note(ctx, chosen))
    elif chosen.fits and chosen.layout.tp > 1 and chosen.decode.expected:
        reasons.append(_link_note(ctx, chosen))
    experts = [c for c in candidates if c.layout.strategy == EXPERT and c.decode.expected]
    if experts and chosen.layout.strategy != EXPERT:
        best = max(experts, key=lambda c: _objective(c, ctx.workload.concurrency))
        reasons.append(
            f"Expert parallel on {best.world} GPUs would give "
            f"{_objective(best, ctx.workload.concurrency):.1f} tok/s: each GPU holds "
            f"{config.num_local_experts // best.world} whole experts, so a step waits for the GPU "
            "whose experts the tokens picked most, and tokens travel to their experts and back "
            "with two all-to-alls per layer."
        )
    if chosen.layout.tp > 1 and ctx.engine.row_split_tp:
        reasons.append(
            f"{ctx.engine.name}'s tensor parallelism is its row split (--split-mode row)."
        )
    if ctx.engine.name in CALIBRATION_PARENT:
        reasons.append(
            f"{ctx.engine.name} has no published measurements of its own: it is predicted with "
            f"{CALIBRATION_PARENT[ctx.engine.name]}'s constants."
        )
    elif not ctx.calibration.is_measured(ctx.engine.name, ctx.fmt.family):
        reasons.append(
            f"No published measurement covers {ctx.engine.name} with {ctx.fmt.family} weights: its "
            "bandwidth efficiency is the median of the measured engines for this format, and its "
            "per-layer overhead the pooled value of the engines with few rows."
        )
    unknown_bandwidth = sorted({d.name for d in chosen.layout.devices if not d.spec.bandwidth_gbs})
    if unknown_bandwidth:
        reasons.append(
            f"gpu_specs.csv has no citable memory bandwidth for {', '.join(unknown_bandwidth)}: "
            "speed is not predicted."
        )
    else:
        estimated = sorted({d.name for d in chosen.layout.devices if peak_tflops(d.spec)[1]})
        if estimated:
            reasons.append(
                "Prefill is estimated from bandwidth: gpu_specs.csv has no citable tensor TFLOPS "
                f"for {', '.join(estimated)}."
            )
    if config.is_moe:
        reasons.append(
            f"Mixture of experts: all {config.num_local_experts} experts stay in memory, "
            f"{config.num_experts_per_tok} are read per token."
        )
    if config.sliding_window and "gemma2" in config.architecture.lower():
        reasons.append(
            "Gemma 2 alternates sliding-window layers; the KV cache is sized as if every "
            "layer kept the full context (an upper bound)."
        )
    if precision_was_default and ctx.fmt.family == "float" and not chosen.fits:
        reasons.append("No --quantization given: planned at the checkpoint's own precision.")
    return reasons


def _why_layout(ctx: _Context, candidates: list[Candidate], chosen: Candidate) -> str:
    concurrency = ctx.workload.concurrency
    measure = (
        "single-stream decode" if concurrency == 1 else f"throughput at {concurrency} sequences"
    )
    others = [c for c in candidates if c.fits and c is not chosen]
    value = _objective(chosen, concurrency)
    text = f"Chosen: {chosen.label()}"
    if value:
        text += f", {value:.1f} tok/s {measure}"
    faster = [c for c in others if _objective(c, concurrency) > value]
    if faster:
        best = max(faster, key=lambda c: _objective(c, concurrency))
        gain = _objective(best, concurrency) / value - 1 if value else 0.0
        text += (
            f"; {best.label()} would be only {gain:.0%} faster, not worth "
            f"{best.world - chosen.world} more GPU(s)"
        )
    elif others:
        runner = max(others, key=lambda c: _objective(c, concurrency))
        if value and _objective(runner, concurrency):
            text += f"; next best {runner.label()} at {_objective(runner, concurrency):.1f} tok/s"
    if ctx.engine.split_strategy == LAYER_SPLIT and chosen.layout.strategy == LAYER_SPLIT:
        text += f". {ctx.engine.name}'s layer split adds memory, not speed: the GPUs take turns"
    return text + "."


def _expert_note(ctx: _Context, chosen: Candidate) -> str:
    """What expert parallelism costs a decode step: its collectives and its busiest GPU."""
    from mgpu.planner.speed import busiest_rank_experts

    config, layout = ctx.model.config, chosen.layout
    activation = config.hidden_size * 2
    per_token = config.num_hidden_layers * (
        ctx.link.allreduce_seconds(layout.tp, activation)
        + 2 * ctx.link.alltoall_seconds(layout.tp, activation * config.num_experts_per_tok)
    )
    busiest = busiest_rank_experts(config, layout.tp, 1)
    return (
        f"Expert parallel over {ctx.link.name}: {config.num_local_experts // layout.tp} whole "
        f"experts per GPU; one token's {config.num_experts_per_tok} experts put {busiest:.2f} on "
        f"the busiest GPU on average; an all-reduce and two all-to-alls per layer cost "
        f"{per_token * 1e3:.2f} ms per token."
    )


def _link_note(ctx: _Context, chosen: Candidate) -> str:
    config = ctx.model.config
    layout = chosen.layout
    activation = config.hidden_size * 2
    per_token = 2 * config.num_hidden_layers * ctx.link.allreduce_seconds(layout.tp, activation)
    share = per_token * (chosen.decode.expected or 0.0)
    text = (
        f"Tensor parallel over {ctx.link.name}: all-reduces cost {per_token * 1e3:.2f} ms "
        "per token "
        f"({share:.0%} of a decode step)"
    )
    if chosen.single_gpu_decode and chosen.decode.expected:
        text += (
            "; scaling efficiency "
            f"{chosen.decode.expected / chosen.single_gpu_decode / layout.tp:.0%} "
            f"of {layout.tp}x one {layout.devices[0].name}"
        )
    other = "pcie4" if ctx.link.name == "nvlink" else "nvlink"
    try:
        alt_link = make_interconnect(other, list(layout.devices))
    except ConfigError:
        return text + f" ({layout.devices[0].name} has no NVLink)."
    alt = _evaluate(
        _Context(
            ctx.model,
            ctx.fmt,
            ctx.bits,
            ctx.engine,
            alt_link,
            ctx.workload,
            ctx.calibration,
            ctx.constants,
        ),
        layout,
    )
    if alt.decode.expected:
        text += f"; over {other} it would be {alt.decode.expected:.1f} tok/s"
    return text + "."


def _engine_bits(engine: EngineProfile, fmt: QuantFormat, bits: float, hidden: int) -> float:
    """Bits per weight ``engine`` holds of weights in ``fmt`` (``bits`` as stored in the files).

    mgpu converts GGUF blocks to its int4/int8 kernels' layouts (``layers.quantization.gguf``)
    and keeps its own scales, which cost more bits than the file's; other engines run the format
    as stored.
    """
    if engine.name == "mgpu" and fmt.family in ("int8", "int4", "gguf"):
        return stored_bits_per_weight(fmt.name, bits, hidden)
    return bits


def _lighter_precision(ctx: _Context, devices: list[Device]) -> str | None:
    """The highest precision below the planned one that would fit the listed GPUs."""
    for name in _FALLBACK_PRECISIONS:
        fmt = parse_quantization(name)
        bits = _engine_bits(ctx.engine, fmt, fmt.bits_per_weight, ctx.model.config.hidden_size)
        if bits >= ctx.bits or fmt.family not in ctx.engine.families:
            continue
        lighter = _Context(
            ctx.model,
            fmt,
            bits,
            ctx.engine,
            ctx.link,
            ctx.workload,
            ctx.calibration,
            ctx.calibration.constants(ctx.engine.name, fmt.family),
        )
        layouts = _layouts(lighter, devices, "auto", None, None)
        if any(_evaluate(lighter, layout).fits for layout in layouts):
            return f"At --quantization {fmt.name} ({bits:.2f} bits/weight) it would fit these GPUs."
    return None
