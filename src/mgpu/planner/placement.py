"""Layouts (which GPU holds which ranks and layers) and the memory each GPU needs under one.

Every byte of weights and KV cache comes from :mod:`mgpu.memory`, the formula the engine's KV-cache
allocator uses. This module only decides *which* layers and shards land on each GPU::

    TP 2 x PP 2 on 4 GPUs (rank = pp_rank * tp + tp_rank, as in mgpu.config.ParallelConfig)

        stage 0, layers [0, 41): GPU 0 (tp 0) | GPU 1 (tp 1)   + token embedding
        stage 1, layers [41, 80): GPU 2 (tp 0) | GPU 3 (tp 1)  + final norm, LM head

Layer counts are balanced by memory: each next layer goes to the stage whose load-to-capacity ratio
stays lowest, which gives an uneven split on unequal GPUs and moves a layer or two away from the
stages that also hold the embedding or the LM head. :func:`split_layers` is that rule, and (given
each stage's speed) the engine's automatic placement, which follows speed where memory allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from mgpu.config import ModelConfig
from mgpu.memory import kv_bytes_per_token, local_kv_heads, padded_vocab_size, weight_bytes_per_rank
from mgpu.planner.engines import EngineProfile
from mgpu.planner.hardware import Device

GIB = 2**30


@dataclass(frozen=True)
class Workload:
    """What the plan must hold: ``concurrency`` sequences of ``context`` tokens each."""

    context: int
    concurrency: int
    kv_bytes_per_element: float


@dataclass(frozen=True)
class Layout:
    """A placement of ``tp x pp`` ranks on GPUs; ``devices`` is in rank order."""

    strategy: str
    tp: int
    pp: int
    layer_split: tuple[int, ...]
    devices: tuple[Device, ...]

    def stage_devices(self, pp_rank: int) -> tuple[Device, ...]:
        """The GPUs of pipeline stage ``pp_rank``."""
        return self.devices[pp_rank * self.tp : (pp_rank + 1) * self.tp]

    def layer_range(self, pp_rank: int) -> tuple[int, int]:
        """Half-open layer range of stage ``pp_rank``."""
        start = sum(self.layer_split[:pp_rank])
        return start, start + self.layer_split[pp_rank]


@dataclass(frozen=True)
class RankMemory:
    """Memory of one GPU under a layout, in bytes."""

    device: Device
    tp_rank: int
    pp_rank: int
    layers: tuple[int, int]
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    kv_bytes_per_token: int

    @property
    def required(self) -> int:
        """Everything this GPU must hold."""
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def free(self) -> int:
        """Memory left (negative when it does not fit)."""
        return int(self.device.memory_gib * GIB) - self.required


def vector_bytes(bits_per_weight: float) -> int:
    """Norm weights and biases stay in 16-bit, or 32-bit for an f32 model.

    Args:
        bits_per_weight: the matrices' precision.
    """
    return 4 if bits_per_weight >= 32 else 2


def activation_bytes(
    model: ModelConfig, engine: EngineProfile, tp: int, workload: Workload, is_last_stage: bool
) -> int:
    """Peak activation memory of one rank: one prefill chunk through the widest layer.

    The chunk (``engine.prefill_chunk_tokens`` tokens, or the whole batch when larger) needs the
    residual stream and normed input (2h), the attention output (h), Q/K/V of the rank's heads, and
    the rank's gate and up projections (2 x intermediate / tp), all in 16-bit; the last stage also
    holds fp32 logits for the last token of every sequence. Attention scores are not materialised
    (flash attention).

    Args:
        model: the architecture.
        engine: sets the prefill chunk.
        tp: tensor-parallel size (the rank's share of heads and MLP width).
        workload: context and concurrency.
        is_last_stage: the rank computes logits.
    """
    tokens = min(engine.prefill_chunk_tokens, workload.context * workload.concurrency)
    tokens = max(tokens, workload.concurrency)
    q_local = model.num_attention_heads // tp
    width = 3 * model.hidden_size + (q_local + 2 * local_kv_heads(model, tp)) * model.head_dim
    width += 2 * (model.intermediate_size // tp)
    total = tokens * width * 2
    if is_last_stage:
        total += workload.concurrency * (padded_vocab_size(model.vocab_size, tp) // tp) * 4
    return total


def rank_memory(
    model: ModelConfig,
    bits_per_weight: float,
    engine: EngineProfile,
    layout: Layout,
    workload: Workload,
) -> list[RankMemory]:
    """Memory of every GPU of ``layout``.

    Args:
        model: the architecture.
        bits_per_weight: weight precision including block scales.
        engine: decides where the embedding and (for a row split) the KV cache live.
        layout: the placement.
        workload: context length, concurrency, KV element size.
    """
    ranks = []
    for pp_rank in range(layout.pp):
        start, end = layout.layer_range(pp_rank)
        is_last = pp_rank == layout.pp - 1
        # llama.cpp keeps the token embedding in host memory: the GPUs never hold it.
        holds_embedding = pp_rank == 0 and not engine.embedding_on_host
        weights = weight_bytes_per_rank(
            model,
            bits_per_weight,
            layout.tp,
            (start, end),
            holds_embedding,
            is_last,
            vector_bytes(bits_per_weight),
        )
        for tp_rank, device in enumerate(layout.stage_devices(pp_rank)):
            # A llama.cpp row split keeps the whole KV cache and activations on the main GPU.
            on_main = not engine.row_split_tp or layout.tp == 1 or tp_rank == 0
            kv_tp = 1 if engine.row_split_tp else layout.tp
            per_token = kv_bytes_per_token(model, end - start, kv_tp, workload.kv_bytes_per_element)
            per_token = per_token if on_main else 0
            activations = (
                activation_bytes(model, engine, kv_tp, workload, is_last) if on_main else 0
            )
            ranks.append(
                RankMemory(
                    device=device,
                    tp_rank=tp_rank,
                    pp_rank=pp_rank,
                    layers=(start, end),
                    weights=weights,
                    kv_cache=per_token * workload.context * workload.concurrency,
                    activations=activations,
                    overhead=int(engine.overhead_gib * GIB),
                    kv_bytes_per_token=per_token,
                )
            )
    return ranks


def balanced_split(
    model: ModelConfig,
    bits_per_weight: float,
    engine: EngineProfile,
    stages: list[tuple[Device, ...]],
    tp: int,
    workload: Workload,
) -> tuple[int, ...]:
    """Layers per pipeline stage, balanced by each stage's memory.

    Args:
        model: the architecture.
        bits_per_weight: weight precision.
        engine: where the embedding lives and how much each GPU keeps for itself.
        stages: the GPUs of each stage, in order.
        tp: tensor-parallel size within a stage.
        workload: sizes the KV cache each layer brings along.
    """
    pp = len(stages)
    layers = model.num_hidden_layers
    if pp == 1:
        return (layers,)
    vec = vector_bytes(bits_per_weight)
    kv_tp = 1 if engine.row_split_tp else tp
    per_layer = weight_bytes_per_rank(model, bits_per_weight, tp, (0, 1), False, False, vec)
    per_layer += (
        kv_bytes_per_token(model, 1, kv_tp, workload.kv_bytes_per_element)
        * workload.context
        * workload.concurrency
    )
    first = (
        0
        if engine.embedding_on_host
        else weight_bytes_per_rank(model, bits_per_weight, tp, (0, 0), True, False, vec)
    )
    last = weight_bytes_per_rank(model, bits_per_weight, tp, (0, 0), False, True, vec)
    capacity = []
    fixed = []
    for index, devices in enumerate(stages):
        is_last = index == pp - 1
        reserved = engine.overhead_gib * GIB + activation_bytes(
            model, engine, kv_tp, workload, is_last
        )
        capacity.append(min(d.memory_gib for d in devices) * GIB - reserved)
        fixed.append((first if index == 0 else 0) + (last if is_last else 0))
    return split_layers(layers, per_layer, fixed, capacity)


def split_layers(
    num_layers: int,
    per_layer: float,
    fixed: list[float] | tuple[float, ...],
    capacity: list[float] | tuple[float, ...],
    speed: list[float] | tuple[float, ...] | None = None,
) -> tuple[int, ...]:
    """Layers per stage, one at a time: by memory, or by speed where memory allows.

    Without ``speed`` each next layer goes to the stage whose load-to-capacity ratio stays lowest
    (the KV cache each stage has left stays in proportion to its memory). With ``speed`` it goes to
    the stage that would finish it soonest, ``(layers + 1) / speed``, among the stages it still
    fits on; a pipeline runs at the pace of its slowest stage, so layers follow each device's
    throughput until a device's memory is full.

    Args:
        num_layers: decoder layers to place (at least one per stage).
        per_layer: bytes one layer adds to a stage (weights, and KV cache where sized).
        fixed: bytes each stage holds besides its layers (embedding, LM head).
        capacity: bytes each stage may fill.
        speed: relative throughput of each stage (None: split by memory).
    """
    pp = len(capacity)
    counts = [1] * pp
    load = [f + per_layer for f in fixed]

    def memory_ratio(i: int) -> float:
        return (load[i] + per_layer) / capacity[i] if capacity[i] > 0 else float("inf")

    def by_speed(i: int) -> tuple[bool, float, float]:
        assert speed is not None
        return load[i] + per_layer > capacity[i], (counts[i] + 1) / speed[i], memory_ratio(i)

    for _ in range(num_layers - pp):
        best = min(range(pp), key=memory_ratio if speed is None else by_speed)
        counts[best] += 1
        load[best] += per_layer
    return tuple(counts)


def make_layout(
    strategy: str,
    devices: list[Device],
    tp: int,
    pp: int,
    model: ModelConfig,
    bits_per_weight: float,
    engine: EngineProfile,
    workload: Workload,
) -> Layout:
    """Place ``tp x pp`` ranks on ``devices`` (rank order), with a memory-balanced layer split.

    Args:
        strategy: one of :data:`mgpu.planner.engines.STRATEGIES`.
        devices: exactly ``tp * pp`` GPUs.
        tp: tensor-parallel size.
        pp: pipeline stages.
        model: the architecture.
        bits_per_weight: weight precision.
        engine: the engine that will run it.
        workload: context and concurrency.
    """
    stages = [tuple(devices[s * tp : (s + 1) * tp]) for s in range(pp)]
    split = balanced_split(model, bits_per_weight, engine, stages, tp, workload)
    return Layout(strategy, tp, pp, split, tuple(devices))
