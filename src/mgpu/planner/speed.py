"""The speed model: time per decode step and per prefill chunk, from bytes, FLOPs and links.

One decode step reads every weight a token touches and the KV cache written so far, so at batch 1
its time is set by memory bandwidth (docs/planner.md gives the derivation)::

    t = (a[engine, format] + d[engine] on HBM GPUs)
          x sum over stages of max over the stage's GPUs (bytes read / bandwidth)
        + c[engine] x layers                      kernel launches and small ops, per layer
        + s x 2 x layers   (tensor parallel)       engine-side cost of each all-reduce
                           (expert parallel: 3 x layers, an all-reduce and two all-to-alls)
        + h x (stages - 1) (pipeline / split)      hand-over between stages
        + r x layers x (tp - 1) (llama.cpp row split)
        + link time: collective latency and bytes on the interconnect, hop transfers

``a`` is the inverse of the bandwidth efficiency the engine reaches with that weight format
(a >= 1) and ``d`` what HBM adds to it; ``a, d, c, s, h, r`` are fitted to the published
measurements by :mod:`mgpu.planner.calibration`; the link time is physics from
data/interconnects.json.

With many sequences a step can become compute-bound: each stage then takes
max(a x memory time, FLOPs / (peak x MFU)). Prefill is the same formula for one chunk of prompt
tokens, where the FLOPs dominate.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import cache

from mgpu.config import ModelConfig
from mgpu.memory import kv_bytes_per_token, rank_weights
from mgpu.planner.engines import EXPERT, EngineProfile
from mgpu.planner.hardware import GpuSpec, Interconnect, gpu_catalogue
from mgpu.planner.placement import Layout, vector_bytes


@dataclass(frozen=True)
class StageCost:
    """One pipeline stage at 100% of its GPUs' peak: the slowest rank's numbers."""

    memory_s: float
    compute_s: float
    layers: int
    is_hbm: bool = False
    """The slowest rank's memory is HBM (its bandwidth efficiency may differ)."""


@dataclass(frozen=True)
class StepCost:
    """One forward step of the whole layout, split into the terms the calibration scales."""

    stages: tuple[StageCost, ...]
    stage_hops: int
    row_split_syncs: int
    allreduces: int
    link_s: float

    @property
    def memory_s(self) -> float:
        """Sum over stages of the bandwidth-bound time at 100% efficiency."""
        return sum(stage.memory_s for stage in self.stages)

    @property
    def hbm_memory_s(self) -> float:
        """The part of :attr:`memory_s` spent in stages whose slowest GPU has HBM."""
        return sum(stage.memory_s for stage in self.stages if stage.is_hbm)

    @property
    def layers(self) -> int:
        """Layers run one after another."""
        return sum(stage.layers for stage in self.stages)


@dataclass(frozen=True)
class SpeedConstants:
    """The calibrated constants for one engine and weight format."""

    inverse_efficiency: float
    layer_overhead_s: float
    hbm_inverse_efficiency: float
    """``a`` for stages on HBM GPUs (equal to ``inverse_efficiency`` where not calibrated apart)."""
    allreduce_overhead_s: float
    stage_hop_s: float
    row_split_sync_s: float
    mfu: float


@cache
def _flops_per_byte() -> float:
    """Median dense tensor TFLOPS per GB/s over the catalogue GPUs that have both numbers."""
    ratios = [g.tflops / g.bandwidth_gbs for g in gpu_catalogue() if g.tflops and g.bandwidth_gbs]
    return statistics.median(ratios)


def peak_tflops(spec: GpuSpec) -> tuple[float | None, bool]:
    """Dense 16-bit tensor TFLOPS, and whether it is estimated.

    Where gpu_specs.csv has no citable figure the peak is estimated from the card's bandwidth and
    the median compute-to-bandwidth ratio of the catalogue; plans say so when it matters.

    Args:
        spec: the GPU.
    """
    if spec.tflops:
        return spec.tflops, False
    if spec.bandwidth_gbs:
        return spec.bandwidth_gbs * _flops_per_byte(), True
    return None, True


def expert_fraction(model: ModelConfig, batch: int) -> float:
    """Share of a mixture's experts that a batch touches (each token picks k of E at random).

    Args:
        model: the architecture (1.0 for a dense model).
        batch: tokens in the step.
    """
    if not model.is_moe:
        return 1.0
    chosen = model.num_experts_per_tok / model.num_local_experts
    return 1.0 - (1.0 - chosen) ** batch


def busiest_rank_experts(model: ModelConfig, ranks: int, tokens: int) -> float:
    """Expected experts per layer the busiest rank reads when experts are placed whole on ranks.

    Routing is taken as uniform. One token picks k of E experts without replacement, so each
    rank's count is hypergeometric and ``P(max < m)`` is the coefficient of ``x^k`` in
    ``(sum_{j<m} C(E/n, j) x^j)^n`` over ``C(E, k)``. With several tokens each expert is touched
    with probability ``1 - (1 - k/E)^tokens`` and the ranks are treated as independent binomials.

    Args:
        model: a mixture of experts whose expert count ``ranks`` divides.
        ranks: expert-parallel ranks.
        tokens: tokens in the step.
    """
    experts, k = model.num_local_experts, model.num_experts_per_tok
    local = experts // ranks
    if tokens == 1:
        total = math.comb(experts, k)
        expected = 0.0
        for m in range(1, min(k, local) + 1):
            poly = [1]
            factor = [math.comb(local, j) for j in range(m)]
            for _ in range(ranks):
                poly = [
                    sum(poly[i] * factor[n - i] for i in range(len(poly)) if 0 <= n - i < m)
                    for n in range(len(poly) + m - 1)
                ][: k + 1]
            below = poly[k] / total if k < len(poly) else 0.0
            expected += 1.0 - below
        return expected
    p = 1.0 - (1.0 - k / experts) ** tokens
    expected = 0.0
    cdf = 0.0
    for m in range(1, local + 1):
        cdf += math.comb(local, m - 1) * p ** (m - 1) * (1 - p) ** (local - m + 1)
        expected += 1.0 - cdf**ranks
    return expected


def _rank_read_bytes(
    model: ModelConfig,
    bits: float,
    tp: int,
    layers: tuple[int, int],
    is_last: bool,
    batch: int,
    experts_whole: bool = False,
) -> tuple[float, float]:
    """Weight bytes one rank reads per step, and the multiply-add count per token.

    The token embedding is a table lookup (one row per token), so it is not counted as read.
    With ``experts_whole`` (expert parallelism) the rank holds ``E / tp`` whole experts instead of
    a ``1 / tp`` slice of each: the same bytes, but it reads the experts its busiest share of the
    tokens picked (:func:`busiest_rank_experts`).
    """
    counts = rank_weights(model, tp, layers, is_first_stage=False, is_last_stage=is_last)
    matrices = float(counts.matrix_elements)
    if model.is_moe and experts_whole:
        num_layers = layers[1] - layers[0]
        expert = 3 * model.hidden_size * model.intermediate_size * num_layers
        held = model.num_local_experts * 3 * model.hidden_size * (model.intermediate_size // tp)
        dense = matrices - held * num_layers
        read = dense + busiest_rank_experts(model, tp, batch) * expert
        active = dense + busiest_rank_experts(model, tp, 1) * expert
        return read * bits / 8 + counts.vector_elements * vector_bytes(bits), float(active)
    if model.is_moe:
        expert = 3 * model.hidden_size * (model.intermediate_size // tp) * (layers[1] - layers[0])
        idle = model.num_local_experts * expert
        matrices -= idle * (1.0 - expert_fraction(model, batch))
        active = counts.matrix_elements - idle * (
            1 - model.num_experts_per_tok / model.num_local_experts
        )
    else:
        active = counts.matrix_elements
    read = matrices * bits / 8 + counts.vector_elements * vector_bytes(bits)
    return read, float(active)


def has_bandwidth(layout: Layout) -> bool:
    """Whether every GPU of the layout has a known memory bandwidth (needed for any speed).

    Args:
        layout: the placement.
    """
    return all(d.spec.bandwidth_gbs is not None for d in layout.devices)


def step_cost(
    model: ModelConfig,
    bits: float,
    engine: EngineProfile,
    layout: Layout,
    link: Interconnect,
    batch: int,
    position: int,
    kv_bytes_per_element: float,
    new_tokens: int = 1,
) -> StepCost:
    """The cost of one step: ``batch`` sequences ``position`` tokens in, each adding ``new_tokens``.

    Decode is ``new_tokens=1``; a prefill chunk is ``batch=1, new_tokens=chunk``.

    Args:
        model: the architecture.
        bits: weight bits per weight.
        engine: the engine (decides tensor-parallel style).
        layout: the placement.
        link: the interconnect.
        batch: sequences in the step.
        position: tokens already in each sequence's KV cache.
        kv_bytes_per_element: KV-cache element size.
        new_tokens: tokens each sequence processes in this step.

    Raises:
        ValueError: when a GPU's bandwidth is unknown (check :func:`has_bandwidth` first).
    """
    tokens = batch * new_tokens
    stages = []
    for pp_rank in range(layout.pp):
        start, end = layout.layer_range(pp_rank)
        is_last = pp_rank == layout.pp - 1
        kv_tp = 1 if engine.row_split_tp else layout.tp
        kv_read = kv_bytes_per_token(model, end - start, kv_tp, kv_bytes_per_element)
        kv_read *= batch * position
        worst_memory = worst_compute = 0.0
        worst_hbm = False
        for tp_rank, device in enumerate(layout.stage_devices(pp_rank)):
            if device.spec.bandwidth_gbs is None:
                raise ValueError(f"{device.name} has no known memory bandwidth")
            read, active = _rank_read_bytes(
                model, bits, layout.tp, (start, end), is_last, tokens, layout.strategy == EXPERT
            )
            if not engine.row_split_tp or layout.tp == 1 or tp_rank == 0:
                read += kv_read
            flops, _ = peak_tflops(device.spec)
            memory = read / (device.spec.bandwidth_gbs * 1e9)
            if memory >= worst_memory:
                worst_memory, worst_hbm = memory, device.spec.is_hbm
            worst_compute = max(worst_compute, 2 * active * tokens / ((flops or 1.0) * 1e12))
        stages.append(StageCost(worst_memory, worst_compute, end - start, worst_hbm))

    activation = tokens * model.hidden_size * 2
    link_s = (layout.pp - 1) * link.transfer_seconds(activation)
    allreduces = row_syncs = 0
    if layout.tp > 1 and engine.row_split_tp:
        row_syncs = model.num_hidden_layers * (layout.tp - 1)
    elif layout.strategy == EXPERT:
        # One all-reduce after attention, then the tokens' k copies go to their experts' ranks
        # and come back: two all-to-alls per layer, counted with the all-reduces for overhead.
        layers = model.num_hidden_layers
        dispatched = activation * model.num_experts_per_tok
        link_s += layers * link.allreduce_seconds(layout.tp, activation)
        link_s += 2 * layers * link.alltoall_seconds(layout.tp, dispatched)
        allreduces = 3 * layers
    elif layout.tp > 1:
        allreduces = 2 * model.num_hidden_layers
        link_s += allreduces * link.allreduce_seconds(layout.tp, activation)
    return StepCost(tuple(stages), layout.pp - 1, row_syncs, allreduces, link_s)


def _stage_seconds(stage: StageCost, k: SpeedConstants) -> float:
    a = k.hbm_inverse_efficiency if stage.is_hbm else k.inverse_efficiency
    return max(a * stage.memory_s, stage.compute_s / k.mfu) + (k.layer_overhead_s * stage.layers)


def step_seconds(cost: StepCost, k: SpeedConstants) -> float:
    """Time of one step with all stages run one after another (a single sequence's view).

    Args:
        cost: the step's terms.
        k: the calibrated constants.
    """
    return (
        sum(_stage_seconds(stage, k) for stage in cost.stages)
        + k.allreduce_overhead_s * cost.allreduces
        + k.stage_hop_s * cost.stage_hops
        + k.row_split_sync_s * cost.row_split_syncs
        + cost.link_s
    )


def round_seconds(cost: StepCost, k: SpeedConstants, pipelined: bool) -> float:
    """Time for every sequence of a batch to advance one token.

    A pipelined engine (``pipelined``) splits the batch into one micro-batch per stage and keeps
    every stage busy, so ``cost`` is one micro-batch's and a round costs the slowest stage once per
    micro-batch. Otherwise (one stage, or a sequential layer split as in llama.cpp) the stages run
    one after another for the whole batch and ``cost`` is the whole batch's.

    Args:
        cost: one micro-batch's step when ``pipelined``, else the whole batch's.
        k: the calibrated constants.
        pipelined: stages overlap on different micro-batches.
    """
    if not pipelined:
        return step_seconds(cost, k)
    stage_times = [_stage_seconds(stage, k) for stage in cost.stages]
    shared = step_seconds(cost, k) - sum(stage_times)
    return len(stage_times) * (max(stage_times) + shared / len(stage_times))
