"""From raw timings to the numbers of a run: per-level summaries, JSON, CSV, tables and a plot.

The JSON layout (``SCHEMA``) is stable: tools compare files of different runs and servers with
``mgpu bench --compare A.json B.json``. Every latency is in seconds, summarised as ``mean``,
``p50``, ``p90`` and ``p99`` over the requests that succeeded (``null`` when none did).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from mgpu.bench.runner import LevelRun
from mgpu.errors import ConfigError

#: Version tag of the JSON layout; bumped when a key changes meaning or goes away.
SCHEMA = "mgpu-bench/1"
#: Keys of each level, in the order of the CSV columns.
LEVEL_KEYS = (
    "concurrency",
    "request_rate",
    "num_requests",
    "completed",
    "errors",
    "duration_s",
    "requests_per_s",
    "output_tokens_per_s",
    "total_output_tokens",
    "total_prompt_tokens",
)
#: Latency summaries of each level.
LATENCY_KEYS = ("ttft_s", "itl_s", "tpot_s", "e2e_s")
STAT_KEYS = ("mean", "p50", "p90", "p99")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: list[float]) -> dict[str, float | None]:
    """``mean``, ``p50``, ``p90``, ``p99`` of ``values`` (all None when empty)."""
    if not values:
        return dict.fromkeys(STAT_KEYS)
    return {
        "mean": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def summarize_level(run: LevelRun) -> dict[str, Any]:
    """The numbers of one level (keys ``LEVEL_KEYS``, ``LATENCY_KEYS`` and ``error_kinds``)."""
    ok = [r for r in run.results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max(run.duration, 1e-9)
    return {
        "concurrency": run.concurrency,
        "request_rate": run.request_rate,
        "num_requests": len(run.results),
        "completed": len(ok),
        "errors": len(run.results) - len(ok),
        "duration_s": run.duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": output_tokens / duration,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_s": summarize([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": summarize([gap for r in ok for gap in r.inter_token_latencies]),
        "tpot_s": summarize([t for r in ok if (t := r.time_per_output_token) is not None]),
        "e2e_s": summarize([r.latency for r in ok]),
        "error_kinds": dict(Counter(r.error for r in run.results if not r.ok)),
    }


def run_document(meta: dict[str, Any], levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document of a run: ``schema``, the run's settings under ``meta``, ``levels``."""
    return {"schema": SCHEMA, "meta": meta, "levels": levels}


def load_document(path: Path) -> dict[str, Any]:
    """Read a run's JSON, refusing a file of another layout."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfigError(f"{path} is not an `mgpu bench --json` file ({SCHEMA})")
    return doc


def to_csv(doc: dict[str, Any]) -> str:
    """One row per level: ``LEVEL_KEYS``, then ``<latency>_<stat>`` columns."""
    columns = [*LEVEL_KEYS, *(f"{k}_{s}" for k in LATENCY_KEYS for s in STAT_KEYS)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", *columns])
    for level in doc["levels"]:
        row = [level.get(k) for k in LEVEL_KEYS]
        row += [level[k][s] for k in LATENCY_KEYS for s in STAT_KEYS]
        writer.writerow([doc["meta"].get("label", ""), *("" if v is None else v for v in row)])
    return buffer.getvalue()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def level_name(level: dict[str, Any]) -> str:
    """``c=8`` for a closed loop, ``rate=4/s`` (``, c<=8``) under Poisson arrivals."""
    if level["request_rate"] is None:
        return f"c={level['concurrency']}"
    cap = f", c<={level['concurrency']}" if level["concurrency"] else ""
    return f"rate={level['request_rate']:g}/s{cap}"


def format_table(doc: dict[str, Any]) -> str:
    """A fixed-width table of a run: one line per level, latencies in milliseconds."""
    head = (
        f"{'level':<16}{'ok/err':>9}{'req/s':>8}{'out tok/s':>11}"
        f"{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'TPOT':>8}{'e2e p50':>9}{'p99':>9}"
    )
    lines = [head, "-" * len(head)]
    for lv in doc["levels"]:
        lines.append(
            f"{level_name(lv):<16}{lv['completed']:>5}/{lv['errors']:<3}"
            f"{lv['requests_per_s']:>8.2f}{lv['output_tokens_per_s']:>11.1f}"
            f"{_ms(lv['ttft_s']['p50']):>10}{_ms(lv['ttft_s']['p99']):>8}"
            f"{_ms(lv['itl_s']['p50']):>9}{_ms(lv['itl_s']['p99']):>8}"
            f"{_ms(lv['tpot_s']['mean']):>8}"
            f"{_ms(lv['e2e_s']['p50']):>9}{_ms(lv['e2e_s']['p99']):>9}"
        )
        if lv["error_kinds"]:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(lv["error_kinds"].items()))
            lines.append(f"{'':<16}errors: {kinds}")
    return "\n".join(lines)


def compare_table(docs: list[tuple[str, dict[str, Any]]]) -> str:
    """Runs side by side: per level (matched by name), output tokens/s and TTFT/ITL p50 of each
    run, and each run's throughput as a multiple of the first's.

    Args:
        docs: (label, document) pairs; the first is the baseline.
    """
    names: list[str] = []
    by_run = []
    for _, doc in docs:
        levels = {level_name(lv): lv for lv in doc["levels"]}
        by_run.append(levels)
        names += [n for n in levels if n not in names]
    labels = [label for label, _ in docs]
    width = max(14, *(len(label) + 2 for label in labels))
    head = f"{'level':<16}" + "".join(f"{label:>{width}}" for label in labels)
    lines = ["output tokens/s (x the first run), TTFT and ITL p50", head, "-" * len(head)]
    for name in names:
        base = by_run[0].get(name)
        tput, ttft, itl = f"{name:<16}", f"{'  TTFT p50 ms':<16}", f"{'  ITL p50 ms':<16}"
        for levels in by_run:
            lv = levels.get(name)
            if lv is None:
                tput, ttft, itl = tput + f"{'-':>{width}}", ttft + " " * width, itl + " " * width
                continue
            ratio = ""
            if base is not None and base["output_tokens_per_s"] > 0:
                ratio = f" ({lv['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x)"
            tput += f"{lv['output_tokens_per_s']:.1f}{ratio}".rjust(width)
            ttft += _ms(lv["ttft_s"]["p50"]).rjust(width)
            itl += _ms(lv["itl_s"]["p50"]).rjust(width)
        lines += [tput, ttft, itl]
    return "\n".join(lines)


def plot(docs: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """Throughput and latency against load, one line per run, written as a PNG.

    Left: output tokens/s; middle: TTFT p50 (p99 dashed); right: ITL p50. The x axis is the
    concurrency (or the request rate for Poisson runs).

    Args:
        docs: (label, document) pairs.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for label, doc in docs:
        levels = doc["levels"]
        by_rate = any(lv["request_rate"] is not None for lv in levels)
        xs = [lv["request_rate"] if by_rate else lv["concurrency"] for lv in levels]
        axes[0].plot(xs, [lv["output_tokens_per_s"] for lv in levels], "o-", label=label)
        (line,) = axes[1].plot(
            xs, [_or_nan(lv["ttft_s"]["p50"]) for lv in levels], "o-", label=label
        )
        axes[1].plot(
            xs, [_or_nan(lv["ttft_s"]["p99"]) for lv in levels], "--", color=line.get_color()
        )
        axes[2].plot(xs, [_or_nan(lv["itl_s"]["p50"]) for lv in levels], "o-", label=label)
        for ax in axes:
            ax.set_xlabel("request rate (1/s)" if by_rate else "concurrent clients")
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("time to first token (s): p50, p99 dashed")
    axes[2].set_ylabel("inter-token latency p50 (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value
