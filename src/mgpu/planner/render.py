"""Terminal tables for plans, recommendations and training plans (``rich``)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mgpu.planner.plan import Plan, Range
from mgpu.planner.recommend import Recommendation
from mgpu.planner.train import TrainPlan


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _range_row(label: str, value: Range) -> list[str]:
    return [label, _num(value.low), _num(value.expected), _num(value.high)]


def render_plan(plan: Plan, console: Console) -> None:
    """Print a plan as tables.

    Args:
        plan: the plan.
        console: where to print.
    """
    gpus = " + ".join(_group(plan.gpus))
    console.print(
        Text.assemble(
            ("mgpu plan: ", "bold"),
            f"{plan.model} at {plan.quantization} ({plan.bits_per_weight:.2f} bits/weight) ",
            f"on {gpus}",
            f" [{plan.interconnect}], engine {plan.engine}, {plan.context} tokens x "
            f"{plan.concurrency} sequence(s)",
        )
    )
    if plan.fits:
        verdict = Text(f"FITS, {plan.margin_gb:.1f} GiB to spare on the fullest GPU", "bold green")
    else:
        verdict = Text(
            f"DOES NOT FIT: {-plan.margin_gb:.1f} GiB short on the fullest GPU", "bold red"
        )
    console.print(verdict)
    layout = f"{plan.strategy}  (tensor parallel {plan.tensor_parallel_size} x pipeline "
    layout += f"{plan.pipeline_parallel_size}, layers {'/'.join(map(str, plan.layer_split))})"
    console.print(Text.assemble(("Strategy: ", "bold"), layout))

    memory = Table(title="Memory per GPU (GiB)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("GPU", "share", "weights", "KV cache", "activ.", "runtime", "free/total"):
        memory.add_column(column, justify="left" if column in ("GPU", "share") else "right")
    for d in plan.devices:
        share = "unused"
        if d.used and d.layers:
            share = f"tp{d.tp_rank} L{d.layers[0]}-{d.layers[1] - 1}"
        free = f"{d.free_gb:.2f}/{d.memory_total_gb:g}"
        memory.add_row(
            f"{d.index} {_short(d.name)}",
            share,
            _num(d.weights_gb, 2),
            _num(d.kv_cache_gb, 2),
            _num(d.activations_gb, 2),
            _num(d.overhead_gb, 2),
            Text(free, "red" if d.used and d.free_gb < 0 else ""),
        )
    console.print(memory)

    speed = Table(title="Speed (tokens/s)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("", "low", "expected", "high"):
        speed.add_column(column, justify="left" if not column else "right")
    speed.add_row(*_range_row("decode, one stream", plan.decode_tokens_per_s))
    speed.add_row(*_range_row("prefill", plan.prefill_tokens_per_s))
    speed.add_row(
        f"throughput at {plan.concurrency} sequence(s)", "", _num(plan.throughput_tokens_per_s), ""
    )
    if plan.tp_scaling_efficiency is not None:
        speed.add_row("TP scaling efficiency", "", f"{plan.tp_scaling_efficiency:.0%}", "")
    console.print(speed)

    power = plan.power
    psu = f"{power.psu_watts:,} W" if power.psu_watts else "n/a"
    gpu_w = f"{power.gpu_watts:,.0f} W" if power.gpu_watts else "n/a"
    console.print(Text.assemble(("Power supply: ", "bold"), f"{psu} (GPUs {gpu_w})"))
    for note in power.notes:
        console.print(f"  - {note}", highlight=False)

    console.print(Text("Commands", "bold"))
    for name, command in plan.commands.items():
        console.print(f"  {name}:", highlight=False)
        for line in command.splitlines():
            console.print(f"    {line}", highlight=False, soft_wrap=True)
    console.print(Text("Why", "bold"))
    for reason in plan.reasons:
        console.print(f"  - {reason}", highlight=False)

    if len(plan.alternatives) > 1:
        table = Table(title="Layouts considered", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("strategy", "tp x pp", "GPUs", "fits", "decode", "throughput"):
            table.add_column(
                column, justify="right" if column in ("decode", "throughput") else "left"
            )
        for alt in plan.alternatives:
            fits = "yes" if alt["fits"] else f"{alt['shortfall_gb']:.1f} GiB short"
            table.add_row(
                alt["strategy"].replace("_", " "),
                f"{alt['tensor_parallel_size']} x {alt['pipeline_parallel_size']}",
                _short(alt["gpus"]),
                fits,
                _num(alt["decode_tokens_per_s"]),
                _num(alt["throughput_tokens_per_s"]),
            )
        console.print(table)


def _short(name: str) -> str:
    """GPU names without the brand words that make tables wrap."""
    return name.replace("GeForce ", "").replace("AMD Instinct ", "")


def _group(names: tuple[str, ...]) -> list[str]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{n}x {name}" for name, n in counts.items()]


def render_recommendation(rec: Recommendation, console: Console) -> None:
    """Print ranked hardware options.

    Args:
        rec: the recommendation.
        console: where to print.
    """
    console.print(
        Text.assemble(
            ("mgpu plan --recommend: ", "bold"),
            f"{rec.model} at {rec.quantization}, {rec.context} tokens x {rec.concurrency} "
            f"sequence(s), engine {rec.engine}"
            + (f", budget ${rec.budget_usd:,.0f}" if rec.budget_usd else ""),
        )
    )
    metric = "decode tok/s" if rec.concurrency == 1 else "throughput tok/s"
    labels = []
    for kind, title in (("buy", "Buy (launch price of the GPUs)"), ("rent", "Rent (per hour)")):
        chosen = [o for o in rec.options if (o.usd_per_hour is not None) == (kind == "rent")]
        if not chosen:
            continue
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("#", "option", "category", "layout", metric, "price"):
            table.add_column(column, justify="right" if column in ("#", metric) else "left")
        for rank, option in enumerate(chosen, start=1):
            labels.append((f"{kind} #{rank}", option))
            if option.usd_per_hour is not None:
                price = f"${option.usd_per_hour:,.2f}/h"
            elif option.price_usd is not None:
                price = f"${option.price_usd:,.0f}"
            else:
                price = "not citable"
            table.add_row(
                str(rank),
                _short(option.name),
                option.category,
                option.plan.strategy.replace("_", " "),
                _num(option.speed),
                price,
            )
        console.print(table)
    console.print(Text("Trade-offs", "bold"))
    for label, option in labels:
        console.print(f"  - {label} {_short(option.name)}: {option.tradeoff}", highlight=False)
    for reason in rec.reasons:
        console.print(f"  - {reason}", highlight=False)


def render_train(plan: TrainPlan, console: Console) -> None:
    """Print a LoRA training plan.

    Args:
        plan: the training plan.
        console: where to print.
    """
    console.print(
        Text.assemble(
            ("mgpu plan --train lora: ", "bold"),
            f"{plan.method} of {plan.model} (base at {plan.quantization}, rank {plan.lora_rank}) "
            f"on {' + '.join(_group(plan.gpus))}, {plan.dataset_tokens:,} tokens per epoch, "
            f"sequences of {plan.seq_len}",
        )
    )
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    console.print(Text(f"{verdict} ({plan.strategy})", "bold green" if plan.fits else "bold red"))
    memory = Table(title="Memory per GPU (GiB)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in (
        "#",
        "GPU",
        "base weights",
        "adapters+optimizer",
        "activations",
        "overhead",
        "free",
    ):
        memory.add_column(column, justify="left" if column == "GPU" else "right")
    for d in plan.devices:
        memory.add_row(
            str(d.index),
            d.name,
            _num(d.weights_gb, 2),
            _num(d.adapters_gb, 2),
            _num(d.activations_gb, 2),
            _num(d.overhead_gb, 2),
            _num(d.free_gb, 2),
        )
    console.print(memory)
    if plan.epoch_hours:
        low, expected, high = plan.epoch_hours
        console.print(
            f"Time per epoch: {expected:.2f} h (range {low:.2f}-{high:.2f} h), "
            f"{_num(plan.tokens_per_s)} tokens/s",
            highlight=False,
        )
    scaling = Table(title="More GPUs of this kind", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("GPUs", "strategy", "fits", "epoch hours", "speed-up"):
        scaling.add_column(column, justify="right" if column != "strategy" else "left")
    for point in plan.scaling:
        scaling.add_row(
            str(point.gpus),
            point.strategy,
            "yes" if point.fits else "no",
            _num(point.epoch_hours, 2),
            _num(point.speedup, 2),
        )
    console.print(scaling)
    console.print(Text("Command", "bold"))
    console.print(f"  {plan.command}", highlight=False, soft_wrap=True)
    console.print(Text("Why", "bold"))
    for reason in plan.reasons:
        console.print(f"  - {reason}", highlight=False)
