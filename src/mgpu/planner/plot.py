"""``--plot FILE.png``: the per-GPU memory breakdown of a plan as stacked bars."""

from __future__ import annotations

from pathlib import Path

from mgpu.planner.plan import Plan
from mgpu.planner.train import TrainPlan

_PARTS = (
    ("weights_gb", "weights", "#4C72B0"),
    ("kv_cache_gb", "KV cache", "#DD8452"),
    ("activations_gb", "activations", "#55A868"),
    ("overhead_gb", "runtime overhead", "#8172B3"),
)
_TRAIN_PARTS = (
    ("weights_gb", "base weights", "#4C72B0"),
    ("adapters_gb", "LoRA adapters, gradients, Adam", "#C44E52"),
    ("activations_gb", "activations", "#55A868"),
    ("overhead_gb", "runtime overhead", "#8172B3"),
)


def _title(plan: Plan | TrainPlan) -> str:
    verdict = "fits" if plan.fits else "does NOT fit"
    if isinstance(plan, TrainPlan):
        return (
            f"{plan.method} of {plan.model} at {plan.quantization}, {plan.seq_len} tokens x "
            f"{plan.micro_batch_size}: {verdict} ({plan.strategy})"
        )
    return (
        f"{plan.model} at {plan.quantization}, {plan.context} tokens x {plan.concurrency}: "
        f"{verdict} ({plan.strategy}, tp={plan.tensor_parallel_size}, "
        f"pp={plan.pipeline_parallel_size})"
    )


def plot_memory(plan: Plan | TrainPlan, path: str | Path) -> Path:
    """Draw one horizontal bar per GPU: each part of its memory, and what is free.

    Args:
        plan: the inference plan (weights, KV cache, activations, overhead) or the training plan
            (base weights, adapters with their optimizer state, activations, overhead) to draw.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the plot only goes to a file
    import matplotlib.pyplot as plt

    parts = _TRAIN_PARTS if isinstance(plan, TrainPlan) else _PARTS
    devices = plan.devices
    used = [getattr(d, "used", True) for d in devices]
    required = [sum(getattr(d, attr) for attr, _, _ in parts) for d in devices]
    labels = [
        f"GPU {d.index}: {d.name}" + ("" if u else " (unused)")
        for d, u in zip(devices, used, strict=True)
    ]
    height = 1.2 + 0.6 * len(devices)
    fig, ax = plt.subplots(figsize=(10, height), dpi=120)
    left = [0.0] * len(devices)
    for attr, label, color in parts:
        values = [getattr(d, attr) for d in devices]
        ax.barh(labels, values, left=left, color=color, label=label, edgecolor="white")
        left = [a + b for a, b in zip(left, values, strict=True)]
    free = [max(0.0, d.free_gb) for d in devices]
    ax.barh(labels, free, left=left, color="#DDDDDD", label="free", edgecolor="white")
    for y, device in enumerate(devices):
        ax.plot([device.memory_total_gb] * 2, [y - 0.45, y + 0.45], color="black", linewidth=1.5)
        end = max(required[y], device.memory_total_gb)
        if used[y] and device.free_gb < 0:
            label, color = f"  {-device.free_gb:.1f} GiB over", "#C44E52"
        else:
            label, color = f"  {required[y]:.1f} / {device.memory_total_gb:g} GiB", "black"
        ax.text(end, y, label, va="center", color=color, fontsize=9)
    tops = [max(r, d.memory_total_gb) for r, d in zip(required, devices, strict=True)]
    ax.set_xlim(0, max(tops) * 1.22)
    ax.invert_yaxis()
    ax.set_xlabel("GiB (black line: GPU memory)")
    ax.set_title(
        _title(plan),
        fontsize=10,
        pad=24,  # room for the legend between the title and the bars
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
