"""``--plot FILE.png``: the per-GPU memory breakdown of a plan as stacked bars."""

from __future__ import annotations

from pathlib import Path

from mgpu.planner.plan import Plan

_PARTS = (
    ("weights_gb", "weights", "#4C72B0"),
    ("kv_cache_gb", "KV cache", "#DD8452"),
    ("activations_gb", "activations", "#55A868"),
    ("overhead_gb", "runtime overhead", "#8172B3"),
)


def plot_memory(plan: Plan, path: str | Path) -> Path:
    """Draw one horizontal bar per GPU: weights, KV cache, activations, overhead, and free memory.

    Args:
        plan: the plan to draw.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the plot only goes to a file
    import matplotlib.pyplot as plt

    devices = plan.devices
    labels = [f"GPU {d.index}: {d.name}" + ("" if d.used else " (unused)") for d in devices]
    height = 1.2 + 0.6 * len(devices)
    fig, ax = plt.subplots(figsize=(10, height), dpi=120)
    left = [0.0] * len(devices)
    for attr, label, color in _PARTS:
        values = [getattr(d, attr) for d in devices]
        ax.barh(labels, values, left=left, color=color, label=label, edgecolor="white")
        left = [a + b for a, b in zip(left, values, strict=True)]
    free = [max(0.0, d.free_gb) for d in devices]
    ax.barh(labels, free, left=left, color="#DDDDDD", label="free", edgecolor="white")
    for y, device in enumerate(devices):
        ax.plot([device.memory_total_gb] * 2, [y - 0.45, y + 0.45], color="black", linewidth=1.5)
        end = max(device.required_gb, device.memory_total_gb)
        if device.used and device.free_gb < 0:
            label, color = f"  {-device.free_gb:.1f} GiB over", "#C44E52"
        else:
            label, color = f"  {device.required_gb:.1f} / {device.memory_total_gb:g} GiB", "black"
        ax.text(end, y, label, va="center", color=color, fontsize=9)
    ax.set_xlim(0, max(max(d.required_gb, d.memory_total_gb) for d in devices) * 1.22)
    ax.invert_yaxis()
    ax.set_xlabel("GiB (black line: GPU memory)")
    verdict = "fits" if plan.fits else "does NOT fit"
    ax.set_title(
        f"{plan.model} at {plan.quantization}, {plan.context} tokens x {plan.concurrency}: "
        f"{verdict} ({plan.strategy}, tp={plan.tensor_parallel_size}, "
        f"pp={plan.pipeline_parallel_size})",
        fontsize=10,
        pad=24,  # room for the legend between the title and the bars
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
