"""``mgpu plan --recommend``: which hardware to buy or rent for a model, ranked, with trade-offs.

Purchase options are, for every card of the catalogue with a known bandwidth, the fewest copies
that hold the model (consumer and workstation cards up to four in one machine, data-centre PCIe
cards up to eight), plus the next count that allows tensor parallelism when the fewest cannot use
it and the larger count is clearly faster; SXM boards are only sold inside servers, so they appear
as cloud instances. Cloud options are the instances of ``data/cloud_prices.json``. Every option is
planned with :func:`mgpu.planner.plan.plan`, so its speed and memory are the planner's own numbers.

Purchase prices are the launch prices of gpu_specs.csv (the GPUs alone, not the machine around
them); where the file has none the option says so instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from mgpu.errors import ConfigError
from mgpu.planner.hardware import Device, GpuSpec, find_gpu, gpu_catalogue
from mgpu.planner.models import ModelSpec, load_model
from mgpu.planner.plan import Plan, plan

MAX_CARDS = {"consumer": 4, "workstation": 4, "datacenter-pcie": 8}
_CATEGORY = {
    "consumer": "consumer",
    "workstation": "workstation",
    "datacenter-pcie": "data-centre card",
}


@dataclass(frozen=True)
class CloudInstance:
    """One priced cloud instance."""

    provider: str
    instance: str
    gpu: GpuSpec
    gpu_count: int
    usd_per_hour: float
    read_on: str | None
    source: str


@cache
def cloud_instances() -> tuple[CloudInstance, ...]:
    """The instances of data/cloud_prices.json."""
    raw = json.loads(resources.files("mgpu.planner").joinpath("data/cloud_prices.json").read_text())
    return tuple(
        CloudInstance(
            provider=item["provider"],
            instance=item["instance"],
            gpu=find_gpu(item["gpu"])[0],
            gpu_count=int(item["gpu_count"]),
            usd_per_hour=float(item["usd_per_hour"]),
            read_on=item.get("read_on"),
            source=item["source"],
        )
        for item in raw["instances"]
    )


@dataclass(frozen=True)
class HardwareOption:
    """One way to run the model, bought or rented."""

    category: str
    name: str
    plan: Plan
    price_usd: float | None
    usd_per_hour: float | None
    price_note: str
    tradeoff: str = ""

    @property
    def speed(self) -> float:
        """Single-stream decode, or aggregate throughput when serving several sequences."""
        value = self.plan.decode_tokens_per_s.expected
        if self.plan.concurrency > 1:
            value = self.plan.throughput_tokens_per_s
        return value or 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "kind": "rent" if self.usd_per_hour is not None else "buy",
            "category": self.category,
            "name": self.name,
            "fits": self.plan.fits,
            "strategy": self.plan.strategy,
            "decode_tokens_per_s": self.plan.decode_tokens_per_s.to_dict(),
            "throughput_tokens_per_s": None
            if self.plan.throughput_tokens_per_s is None
            else round(self.plan.throughput_tokens_per_s, 1),
            "memory_total_gb": sum(d.memory_total_gb for d in self.plan.devices),
            "margin_gb": round(self.plan.margin_gb, 2),
            "psu_watts": self.plan.psu_watts,
            "price_usd": self.price_usd,
            "usd_per_hour": self.usd_per_hour,
            "price_note": self.price_note,
            "tradeoff": self.tradeoff,
            "command": self.plan.commands["mgpu"],
        }


@dataclass(frozen=True)
class Recommendation:
    """Ranked hardware options for one model."""

    model: str
    quantization: str
    engine: str
    context: int
    concurrency: int
    budget_usd: float | None
    options: tuple[HardwareOption, ...]
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (documented in docs/planner.md)."""
        return {
            "model": self.model,
            "quantization": self.quantization,
            "engine": self.engine,
            "context": self.context,
            "concurrency": self.concurrency,
            "budget_usd": self.budget_usd,
            "options": [o.to_dict() for o in self.options],
            "reasons": list(self.reasons),
        }


#: A larger count of the same card is listed too when tensor parallelism makes it this much faster.
TP_UPGRADE_GAIN = 1.2


def _card_plans(spec: GpuSpec, model: ModelSpec, **kwargs: Any) -> list[Plan]:
    """The fewest copies of a card that hold the model, and, when that count cannot use tensor
    parallelism (three cards for 64 heads), the next count that can if it is clearly faster."""
    found: list[Plan] = []
    for count in range(1, MAX_CARDS[spec.form] + 1):
        candidate = plan(model, [Device(spec, spec.memory_gib) for _ in range(count)], **kwargs)
        if not candidate.fits:
            continue
        if not found:
            found.append(candidate)
            if count == 1 or candidate.tensor_parallel_size > 1:
                break
        elif candidate.tensor_parallel_size > 1:
            fewest = found[0].decode_tokens_per_s.expected or 0.0
            if (candidate.decode_tokens_per_s.expected or 0.0) >= TP_UPGRADE_GAIN * fewest:
                found.append(candidate)
            break
    return found


def recommend(
    model: str | ModelSpec,
    *,
    quantization: str | None = None,
    engine: str = "mgpu",
    context: int | None = None,
    concurrency: int = 1,
    kv_cache_dtype: str = "auto",
    budget_usd: float | None = None,
    max_options: int = 10,
) -> Recommendation:
    """Rank the hardware that can run ``model``: cards to buy and cloud instances to rent.

    Cards to buy come first, ranked by predicted speed (single-stream decode, or throughput when
    ``concurrency`` > 1), leaving out those over ``budget_usd``; cloud instances follow, cheapest
    per hour first.

    Args:
        model: catalogue name, HF directory or GGUF file.
        quantization: weight precision (see :func:`mgpu.planner.plan.plan`).
        engine: whose speed to predict.
        context: tokens per sequence (default: as :func:`mgpu.planner.plan.plan` chooses).
        concurrency: sequences at once.
        kv_cache_dtype: KV-cache element type (see :func:`mgpu.planner.plan.plan`).
        budget_usd: most the GPUs may cost to buy.
        max_options: how many options of each kind (buy, rent) to keep.

    Raises:
        ConfigError: for unknown names, or a budget that is not positive.
    """
    if budget_usd is not None and budget_usd <= 0:
        raise ConfigError("--budget must be a positive amount of US dollars")
    spec = load_model(model) if isinstance(model, str) else model
    kwargs: dict[str, Any] = {
        "quantization": quantization,
        "engine": engine,
        "context": context,
        "concurrency": concurrency,
        "kv_cache_dtype": kv_cache_dtype,
    }
    bought: list[HardwareOption] = []
    over_budget = []
    for gpu in gpu_catalogue():
        if gpu.bandwidth_gbs is None or gpu.form not in MAX_CARDS:
            continue
        for found in _card_plans(gpu, spec, **kwargs):
            count = len(found.devices)
            price = gpu.price_usd * count if gpu.price_usd else None
            if budget_usd is not None and price is not None and price > budget_usd:
                over_budget.append(f"{count}x {gpu.name} (${price:,.0f})")
                continue
            note = (
                f"launch price ${gpu.price_usd:,.0f} each" if gpu.price_usd else "no citable price"
            )
            name = f"{count}x {gpu.name}"
            bought.append(HardwareOption(_CATEGORY[gpu.form], name, found, price, None, note))
    rented = []
    for instance in cloud_instances():
        devices = [Device(instance.gpu, instance.gpu.memory_gib) for _ in range(instance.gpu_count)]
        found = plan(spec, devices, **kwargs)
        if found.fits:
            when = f"read {instance.read_on}" if instance.read_on else "undated page"
            rented.append(
                HardwareOption(
                    "cloud",
                    f"{instance.provider} {instance.instance}",
                    found,
                    None,
                    instance.usd_per_hour,
                    f"{when}; {instance.source}",
                )
            )
    bought.sort(key=lambda o: -o.speed)
    rented.sort(key=lambda o: (o.usd_per_hour or 0.0, -o.speed))
    reference = _reference(bought)
    kept = bought[:max_options]
    if reference is not None and reference not in kept:
        kept.append(reference)  # the option every trade-off is measured against stays visible
    options = kept + rented[:max_options]
    options = [_with_tradeoff(o, reference, budget_usd) for o in options]
    # The largest GPU of the catalogue, alone, tells how much memory the model needs in one piece.
    largest = max(gpu_catalogue(), key=lambda g: g.memory_gib)
    probe = plan(spec, [Device(largest, largest.memory_gib)], **kwargs)
    reasons = [
        f"{probe.model} at {probe.quantization}: {probe.memory_required_gb:.1f} GiB on a single "
        f"GPU at {probe.context} tokens x {concurrency} sequences (more when split).",
        "Cards to buy are ranked by predicted "
        + (
            "single-stream decode speed"
            if concurrency == 1
            else f"throughput at {concurrency} sequences"
        )
        + "; cloud instances by price per hour.",
        "Purchase prices are launch prices of the GPUs alone (gpu_specs.csv); used cards and the "
        "rest of the machine are not included.",
    ]
    if over_budget:
        reasons.append(f"Over the ${budget_usd:,.0f} budget: {', '.join(over_budget)}.")
    if not options:
        reasons.append("Nothing in the catalogue holds this model: try a lower --quantization.")
    return Recommendation(
        model=probe.model,
        quantization=probe.quantization,
        engine=probe.engine,
        context=probe.context,
        concurrency=concurrency,
        budget_usd=budget_usd,
        options=tuple(options),
        reasons=tuple(reasons),
    )


def _reference(bought: list[HardwareOption]) -> HardwareOption | None:
    """The purchase with the most speed per dollar: what other options are compared against."""
    priced = [o for o in bought if o.price_usd]
    return max(priced, key=lambda o: o.speed / (o.price_usd or 1.0)) if priced else None


def _with_tradeoff(
    option: HardwareOption, reference: HardwareOption | None, budget_usd: float | None
) -> HardwareOption:
    p = option.plan
    used = [d for d in p.devices if d.used]
    spare = sum(d.free_gb for d in used)
    if len(used) == 1:
        text = (
            f"One GPU: no inter-GPU traffic, nothing to split; {spare:.0f} GiB spare for context."
        )
    else:
        text = (
            f"{len(used)} GPUs share the model ({p.strategy.replace('_', ' ')} over "
            f"{p.interconnect}); "
            f"{spare:.0f} GiB spare in all"
        )
        if p.power.gpu_watts:
            text += f", {p.power.gpu_watts:,.0f} W of GPUs"
        text += "."
    if option.category == "data-centre card":
        text += " Passively cooled: needs a server chassis."
    if option.usd_per_hour is not None:
        text += f" ${option.usd_per_hour * 730:,.0f} a month if always on"
        if budget_usd:
            text += f"; ${budget_usd:,.0f} rents {budget_usd / option.usd_per_hour:,.0f} hours"
        text += "."
    if reference is not None and option is reference:
        text += " Most speed per dollar of the priced cards."
    elif reference is not None and reference.speed and option.speed:
        ratio = option.speed / reference.speed
        text += f" {ratio:.2f}x the speed of {reference.name} (best speed per dollar)"
        if option.price_usd is not None and reference.price_usd:
            text += f" for {option.price_usd / reference.price_usd:.2f}x its price"
        text += "."
    return HardwareOption(
        option.category,
        option.name,
        option.plan,
        option.price_usd,
        option.usd_per_hour,
        option.price_note,
        text,
    )
