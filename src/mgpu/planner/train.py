"""``mgpu plan --train lora``: memory per GPU and time per epoch for LoRA fine-tuning.

Memory per GPU (the base model is frozen; only the adapters train):

- base weights at their precision (bf16 for LoRA, 4-bit for QLoRA), the whole model on every GPU
  under data parallelism (DDP), or 1/N of it plus one gathered layer when sharded (FSDP);
- LoRA adapters on every linear layer (q, k, v, o, gate, up, down): rank x (in + out) parameters
  each, held with their gradient and Adam's two moments in fp32 (16 bytes per parameter), sharded
  too under FSDP;
- activations with gradient checkpointing: each layer's input (batch x seq x hidden, 16-bit), one
  layer's working set recomputed during backward, and the fp32 logits and their gradient;
- the CUDA context and allocator slack (:data:`TRAIN_OVERHEAD_GIB`, an estimate).

Time per epoch = tokens x 6 x active parameters / (GPUs x peak x MFU): forward (2), the recomputed
forward of gradient checkpointing (2) and the backward pass through the frozen weights to the
adapters (2). The MFU is an assumption, not a fit: no measurement of LoRA throughput is in the data,
so the range spans 0.6x to 1.4x of it. FSDP adds the all-gather of the base weights (three passes
per step) over the interconnect, partly hidden under compute (:data:`FSDP_OVERLAP`); DDP adds the
all-reduce of the adapter gradients after each step. The speed-up column and the plan's prose are
both read from the same :class:`StepTime` of each GPU count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mgpu.config import ModelConfig
from mgpu.errors import ConfigError
from mgpu.memory import weight_bytes_per_rank
from mgpu.planner.hardware import Device, Interconnect, make_interconnect, parse_gpus
from mgpu.planner.models import ModelSpec, load_model
from mgpu.planner.placement import GIB
from mgpu.planner.quant import QuantFormat, parse_quantization
from mgpu.planner.speed import peak_tflops

TRAIN_OVERHEAD_GIB = 1.5
#: Assumed model FLOPs utilisation of LoRA training with 16-bit and with 4-bit (dequantised) bases.
TRAIN_MFU = {"float": 0.35, "quantized": 0.20}
#: Share of the shorter of weight gathers and compute that FSDP's prefetching hides (an assumption:
#: gathers compete with compute for memory bandwidth and SMs, so the overlap is never complete).
FSDP_OVERLAP = 0.7
MFU_SPREAD = (0.6, 1.4)
SCALING_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class TrainDevice:
    """One GPU's memory during training, in GiB."""

    index: int
    name: str
    memory_total_gb: float
    weights_gb: float
    adapters_gb: float
    activations_gb: float
    overhead_gb: float

    @property
    def free_gb(self) -> float:
        """Memory left (negative when it does not fit)."""
        used = self.weights_gb + self.adapters_gb + self.activations_gb + self.overhead_gb
        return self.memory_total_gb - used

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "index": self.index,
            "name": self.name,
            "memory_total_gb": round(self.memory_total_gb, 2),
            "weights_gb": round(self.weights_gb, 2),
            "adapters_and_optimizer_gb": round(self.adapters_gb, 2),
            "activations_gb": round(self.activations_gb, 2),
            "overhead_gb": round(self.overhead_gb, 2),
            "free_gb": round(self.free_gb, 2),
        }


@dataclass(frozen=True)
class ScalingPoint:
    """Training on ``gpus`` GPUs of one kind."""

    gpus: int
    strategy: str
    fits: bool
    epoch_hours: float | None
    speedup: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "gpus": self.gpus,
            "strategy": self.strategy,
            "fits": self.fits,
            "epoch_hours": None if self.epoch_hours is None else round(self.epoch_hours, 3),
            "speedup": None if self.speedup is None else round(self.speedup, 2),
        }


@dataclass(frozen=True)
class TrainPlan:
    """A LoRA fine-tuning plan."""

    model: str
    quantization: str
    method: str
    gpus: tuple[str, ...]
    dataset_tokens: int
    seq_len: int
    micro_batch_size: int
    lora_rank: int
    trainable_params: int
    fits: bool
    strategy: str
    devices: tuple[TrainDevice, ...]
    epoch_hours: tuple[float, float, float] | None
    tokens_per_s: float | None
    scaling: tuple[ScalingPoint, ...]
    command: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (documented in docs/planner.md)."""
        hours = self.epoch_hours
        return {
            "fits": self.fits,
            "strategy": self.strategy,
            "method": self.method,
            "model": self.model,
            "quantization": self.quantization,
            "gpus": list(self.gpus),
            "dataset_tokens": self.dataset_tokens,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "lora_rank": self.lora_rank,
            "trainable_params": self.trainable_params,
            "devices": [d.to_dict() for d in self.devices],
            "epoch_hours": None
            if hours is None
            else {
                "low": round(hours[0], 3),
                "expected": round(hours[1], 3),
                "high": round(hours[2], 3),
            },
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 1),
            "scaling": [p.to_dict() for p in self.scaling],
            "command": self.command,
            "reasons": list(self.reasons),
        }


def lora_params(model: ModelConfig, rank: int) -> int:
    """Adapter parameters for LoRA of ``rank`` on every linear layer of every decoder layer.

    Args:
        model: the architecture.
        rank: LoRA rank r.
    """
    h, d = model.hidden_size, model.head_dim
    q, kv, inter = (
        model.num_attention_heads * d,
        model.num_key_value_heads * d,
        model.intermediate_size,
    )
    experts = max(1, model.num_local_experts)
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + experts * 3 * (h + inter)
    return rank * per_layer * model.num_hidden_layers


def _activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int) -> int:
    tokens = micro_batch * seq_len
    checkpoints = model.num_hidden_layers * tokens * model.hidden_size * 2
    q, kv = model.num_attention_heads * model.head_dim, model.num_key_value_heads * model.head_dim
    # One layer recomputed in backward: its activations and their gradients (x2), 16-bit.
    working = tokens * (4 * model.hidden_size + q + 2 * kv + 3 * model.intermediate_size) * 2 * 2
    logits = tokens * model.vocab_size * 4 * 2
    return checkpoints + working + logits


def _memory(
    model: ModelSpec,
    fmt: QuantFormat,
    devices: list[Device],
    sharded: bool,
    rank: int,
    micro_batch: int,
    seq_len: int,
) -> tuple[TrainDevice, ...]:
    config = model.config
    full = weight_bytes_per_rank(config, fmt.bits_per_weight)
    one_layer = weight_bytes_per_rank(config, fmt.bits_per_weight, 1, (0, 1), False, False)
    weights = full / len(devices) + one_layer if sharded else full
    # FSDP shards the adapters, their gradients and optimizer state along with the base weights.
    adapters = lora_params(config, rank) * 16 / (len(devices) if sharded else 1)
    activations = _activation_bytes(config, micro_batch, seq_len)
    return tuple(
        TrainDevice(
            i,
            d.name,
            d.memory_gib,
            weights / GIB,
            adapters / GIB,
            activations / GIB,
            TRAIN_OVERHEAD_GIB,
        )
        for i, d in enumerate(devices)
    )


@dataclass(frozen=True)
class StepTime:
    """One optimizer step on every GPU: what the prose and the speed-up column are both read from.

    ``comm_s`` is the interconnect time of the step (FSDP's weight gathers, or DDP's gradient
    all-reduce) and ``exposed_s`` the part of it the GPUs wait for.
    """

    gpus: int
    strategy: str
    compute_s: float
    comm_s: float
    exposed_s: float
    comm_bytes: float
    steps: float

    @property
    def step_s(self) -> float:
        """Seconds per step."""
        return self.compute_s + self.exposed_s

    @property
    def epoch_s(self) -> float:
        """Seconds per epoch."""
        return self.steps * self.step_s

    @property
    def waiting_share(self) -> float:
        """Share of each step spent waiting on the interconnect."""
        return self.exposed_s / self.step_s


def _step_time(
    model: ModelSpec,
    fmt: QuantFormat,
    devices: list[Device],
    link: Interconnect,
    strategy: str,
    dataset_tokens: int,
    micro_batch: int,
    seq_len: int,
    rank: int,
) -> StepTime | None:
    """The time of one step and the steps of one epoch (None without a citable peak TFLOPS).

    Compute is 6 x active parameters per token at :data:`TRAIN_MFU`. FSDP gathers every base
    weight shard in the forward pass, the recomputed forward and the backward pass; its prefetch
    hides :data:`FSDP_OVERLAP` of the shorter of gather and compute, and the first layer's gather of
    each pass is never hidden. DDP all-reduces the fp32 adapter gradients after the backward pass.
    """
    peaks = [peak_tflops(d.spec)[0] for d in devices]
    if any(p is None for p in peaks):
        return None
    mfu = TRAIN_MFU["float" if fmt.family == "float" else "quantized"]
    slowest = min(p for p in peaks if p is not None) * 1e12 * mfu
    step_tokens = micro_batch * seq_len  # per GPU
    compute = step_tokens * 6 * model.num_active_params / slowest
    count = len(devices)
    steps = dataset_tokens / (step_tokens * count)
    if count == 1:
        return StepTime(1, strategy, compute, 0.0, 0.0, 0.0, steps)
    bandwidth = link.bandwidth_gbs * 1e9
    if strategy == "fsdp":
        full = weight_bytes_per_rank(model.config, fmt.bits_per_weight)
        first = weight_bytes_per_rank(model.config, fmt.bits_per_weight, 1, (0, 1), False, False)
        gathered = 3 * full * (count - 1) / count
        gather = gathered / bandwidth
        exposed = gather - FSDP_OVERLAP * min(gather, compute)
        exposed = max(exposed, 3 * first * (count - 1) / count / bandwidth)
        return StepTime(count, strategy, compute, gather, exposed, gathered, steps)
    grads = lora_params(model.config, rank) * 4
    reduce = link.allreduce_seconds(count, grads)
    return StepTime(count, strategy, compute, reduce, reduce, float(grads), steps)


def plan_lora(
    model: str | ModelSpec,
    gpus: str | list[Device],
    *,
    dataset_tokens: int,
    quantization: str | None = None,
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    lora_rank: int = 16,
    interconnect: str | None = None,
) -> TrainPlan:
    """Plan LoRA (or QLoRA, with a 4-bit ``quantization``) fine-tuning.

    Args:
        model: catalogue name, HF directory or GGUF file.
        gpus: ``--gpus`` text or devices.
        dataset_tokens: tokens in one epoch of the dataset.
        quantization: base-model precision; bf16 (LoRA) by default, int4/nf4 for QLoRA.
        seq_len: training sequence length.
        micro_batch_size: sequences per GPU per step.
        lora_rank: LoRA rank r.
        interconnect: link between the GPUs (see :func:`mgpu.planner.hardware.make_interconnect`).

    Raises:
        ConfigError: for unknown names or non-positive sizes.
    """
    if dataset_tokens < 1 or seq_len < 1 or micro_batch_size < 1 or lora_rank < 1:
        raise ConfigError(
            "--dataset-tokens, --context, --micro-batch-size and --lora-rank must be positive"
        )
    spec = load_model(model) if isinstance(model, str) else model
    devices = parse_gpus(gpus)[0] if isinstance(gpus, str) else list(gpus)
    fmt = parse_quantization(quantization or "bf16")
    if fmt.family in ("gguf", "exl2"):
        raise ConfigError(
            f"LoRA training needs a Hugging Face checkpoint: {fmt.name} is an inference format; "
            "use bf16 (LoRA) or int4 (QLoRA)"
        )
    link = make_interconnect(interconnect, devices)
    method = "LoRA" if fmt.family == "float" else "QLoRA"
    trainable = lora_params(spec.config, lora_rank)

    def layout(group: list[Device]) -> tuple[str, bool, tuple[TrainDevice, ...]]:
        replicated = _memory(spec, fmt, group, False, lora_rank, micro_batch_size, seq_len)
        if all(d.free_gb >= 0 for d in replicated):
            return ("ddp" if len(group) > 1 else "single", True, replicated)
        sharded = _memory(spec, fmt, group, True, lora_rank, micro_batch_size, seq_len)
        strategy = "fsdp" if len(group) > 1 else "single"
        return strategy, all(d.free_gb >= 0 for d in sharded), sharded

    strategy, fits, memory = layout(devices)
    timing = _step_time(
        spec,
        fmt,
        devices,
        link,
        strategy,
        dataset_tokens,
        micro_batch_size,
        seq_len,
        lora_rank,
    )

    scaling = []
    base: StepTime | None = None
    kind = devices[0]
    for count in sorted({*SCALING_COUNTS, len(devices)}):
        group = [Device(kind.spec, kind.memory_gib) for _ in range(count)]
        group_strategy, group_fits, _ = layout(group)
        point = (
            _step_time(
                spec,
                fmt,
                group,
                make_interconnect(interconnect, group),
                group_strategy,
                dataset_tokens,
                micro_batch_size,
                seq_len,
                lora_rank,
            )
            if group_fits
            else None
        )
        if point is not None and base is None:
            base = point  # speed-ups are against the fewest GPUs that fit
        speedup = base.epoch_s / point.epoch_s if (point and base) else None
        hours = point.epoch_s / 3600 if point else None
        scaling.append(ScalingPoint(count, group_strategy, group_fits, hours, speedup))

    epoch = None
    tokens_per_s = None
    if timing is not None and fits:
        low, high = MFU_SPREAD
        seconds = timing.epoch_s
        # More MFU is a shorter epoch: the high MFU gives the low time.
        epoch = (seconds / high / 3600, seconds / 3600, seconds / low / 3600)
        tokens_per_s = dataset_tokens / seconds

    reasons = _train_reasons(spec, fmt, devices, strategy, fits, memory, trainable, seq_len)
    reasons[2:2] = _scaling_reasons(timing, link, base, tuple(scaling))
    command = (
        f"mgpu train --model_name {spec.hf_id or spec.path or spec.name} "
        "--dataset_path data.jsonl --output_dir ./lora-out --num_train_epochs 1 "
        f"--per_device_train_batch_size {micro_batch_size} --gradient_accumulation_steps "
        f"{max(1, math.ceil(16 / (micro_batch_size * len(devices))))}"
        # One process per GPU: without it the run would train on one device.
        + (f" --num_processes {len(devices)}" if len(devices) > 1 else "")
    )
    return TrainPlan(
        model=spec.name,
        quantization=fmt.name,
        method=method,
        gpus=tuple(d.name for d in devices),
        dataset_tokens=dataset_tokens,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        lora_rank=lora_rank,
        trainable_params=trainable,
        fits=fits,
        strategy=strategy,
        devices=memory,
        epoch_hours=epoch,
        tokens_per_s=tokens_per_s,
        scaling=tuple(scaling),
        command=command,
        reasons=tuple(reasons),
    )


def _scaling_reasons(
    timing: StepTime | None,
    link: Interconnect,
    base: StepTime | None,
    scaling: tuple[ScalingPoint, ...],
) -> list[str]:
    """What the interconnect costs each step, in the numbers the speed-up column is made of."""
    if timing is None or timing.gpus == 1:
        return []
    mib = timing.comm_bytes / 2**20
    if timing.strategy == "fsdp":
        text = (
            "The base model does not fit one GPU, so it is sharded (FSDP): each step gathers "
            f"{timing.comm_bytes / GIB:.1f} GiB of weights per GPU over {link.name} "
            f"({timing.comm_s:.2f} s against {timing.compute_s:.2f} s of compute; with "
            f"{FSDP_OVERLAP:.0%} of the shorter hidden by prefetching, "
            f"{timing.waiting_share:.0%} of the step waits on it)"
        )
    else:
        text = (
            "Each GPU holds the whole base model and trains on its own batches: only the adapter "
            f"gradients ({mib:.0f} MiB) cross {link.name}, {timing.waiting_share:.1%} of each step"
        )
    points = [p for p in scaling if p.speedup is not None and base and p.gpus > base.gpus]
    if base and points:
        listed = ", ".join(f"{p.speedup:.2f}x on {p.gpus}" for p in points)
        text += f". Against {base.gpus} GPU(s): {listed}"
    return [text + "."]


def _train_reasons(
    spec: ModelSpec,
    fmt: QuantFormat,
    devices: list[Device],
    strategy: str,
    fits: bool,
    memory: tuple[TrainDevice, ...],
    trainable: int,
    seq_len: int,
) -> list[str]:
    first = memory[0]
    reasons = [
        f"{spec.name}: {trainable / 1e6:.1f} M trainable LoRA parameters "
        f"({trainable / spec.num_params:.2%} of {spec.num_params / 1e9:.1f} B) cost "
        f"{first.adapters_gb:.2f} GiB with gradients and Adam state.",
        f"Base weights at {fmt.name} take {first.weights_gb:.1f} GiB per GPU ({strategy}); "
        f"activations at {seq_len} tokens with gradient checkpointing "
        f"{first.activations_gb:.1f} GiB.",
    ]
    if not fits:
        lighter = "--quantization nf4 (QLoRA), " if fmt.family == "float" else ""
        reasons.append(
            f"It does not fit: {-min(d.free_gb for d in memory):.1f} GiB short per GPU. Try "
            f"{lighter}a shorter --context, or more GPUs."
        )
    reasons.append(
        f"Epoch time assumes {TRAIN_MFU['float' if fmt.family == 'float' else 'quantized']:.0%} "
        "model FLOPs utilisation (an assumption: no LoRA measurement is in the data); the range "
        f"is {MFU_SPREAD[0]}x to {MFU_SPREAD[1]}x of it."
    )
    return reasons
