"""``mgpu monitor``: a live terminal view of a server's devices and ranks, like ``nvidia-smi dmon``.

One row per device and rank: utilisation bar, memory, temperature, power, NVLink traffic (where
NVML reports it), and the rank's split of step time between compute and collectives; the
imbalance ratio and communication fraction on top, highlighted while the server's imbalance
warning stands. With ``--url`` the numbers come from the server's ``/metrics``; without it, from
this host's devices (NVML, else the CPU as a whole).
``--once --json`` prints one snapshot for scripts.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mgpu.monitor.telemetry import local_samples
from mgpu.monitor.watch import MonitorConfig

#: The per-device gauges read from ``/metrics``, by their key in a row.
_DEVICE_GAUGES = {
    "mgpu_device_utilization_ratio": "utilization",
    "mgpu_device_memory_used_bytes": "memory_used_bytes",
    "mgpu_device_memory_total_bytes": "memory_total_bytes",
    "mgpu_device_temperature_celsius": "temperature_celsius",
    "mgpu_device_power_watts": "power_watts",
    "mgpu_device_compute_seconds_total": "compute_seconds",
    "mgpu_device_communication_seconds_total": "communication_seconds",
    "mgpu_device_nvlink_tx_bytes_total": "nvlink_tx_bytes",
    "mgpu_device_nvlink_rx_bytes_total": "nvlink_rx_bytes",
}


@dataclass
class Snapshot:
    """What the view shows at one moment.

    Args:
        source: the server's URL, or ``local``.
        devices: one dict per device and rank (keys of :data:`_DEVICE_GAUGES` plus ``device``,
            ``rank``, ``communication_share`` and, once two snapshots are apart,
            ``nvlink_bytes_per_s``).
        imbalance_ratio: slowest rank's compute over the mean (None locally).
        communication_fraction: share of step time in collectives (None locally).
        transfer_fraction: share of step time moving data in collectives, waits for slower peers
            left out (None locally).
        warning: whether the server's imbalance warning stands.
        requests: running and waiting sequences (empty locally).
        taken_at: monotonic time of the snapshot.
    """

    source: str
    devices: list[dict[str, Any]] = field(default_factory=list)
    imbalance_ratio: float | None = None
    communication_fraction: float | None = None
    transfer_fraction: float | None = None
    warning: bool = False
    requests: dict[str, float] = field(default_factory=dict)
    taken_at: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-able data."""
        return {
            "source": self.source,
            "devices": self.devices,
            "imbalance_ratio": self.imbalance_ratio,
            "communication_fraction": self.communication_fraction,
            "transfer_fraction": self.transfer_fraction,
            "imbalance_warning": self.warning,
            "requests": self.requests,
        }


def parse_metrics(text: str, source: str) -> Snapshot:
    """A snapshot from the text of a server's ``/metrics``.

    Args:
        text: the scrape body.
        source: the server's URL (shown in the view).
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    snap = Snapshot(source)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name in _DEVICE_GAUGES and "rank" in labels:
                key = (labels.get("device", "?"), labels["rank"])
                row = rows.setdefault(key, {"device": key[0], "rank": int(key[1])})
                row[_DEVICE_GAUGES[name]] = value
            elif name == "mgpu_device_imbalance_ratio":
                snap.imbalance_ratio = value
            elif name == "mgpu_communication_fraction":
                snap.communication_fraction = value
            elif name == "mgpu_transfer_fraction":
                snap.transfer_fraction = value
            elif name == "mgpu_imbalance_warning":
                snap.warning = value > 0
            elif name in ("mgpu_num_requests_running", "mgpu_num_requests_waiting"):
                snap.requests[name.removeprefix("mgpu_num_requests_")] = value
    for row in rows.values():
        busy = row.get("compute_seconds", 0.0) + row.get("communication_seconds", 0.0)
        row["communication_share"] = row.get("communication_seconds", 0.0) / busy if busy else None
    snap.devices = sorted(rows.values(), key=lambda r: (r["rank"], r["device"]))
    return snap


def fetch(url: str | None, timeout_s: float = 10.0) -> Snapshot:
    """One snapshot of the server at ``url``, or of this host's devices when ``url`` is None."""
    if url is None:
        devices = []
        for s in local_samples():
            row = s.to_dict()
            row["communication_share"] = None
            devices.append(row)
        return Snapshot("local", devices)
    base = url.rstrip("/")
    response = httpx.get(f"{base}/metrics", timeout=timeout_s)
    response.raise_for_status()
    return parse_metrics(response.text, base)


def _since(now: Snapshot, before: Snapshot | None) -> Snapshot:
    """``now`` with each rank's communication share and NVLink traffic over the time since
    ``before``."""
    if before is None:
        return now
    old = {(r["device"], r["rank"]): r for r in before.devices}
    seconds = now.taken_at - before.taken_at
    for row in now.devices:
        prev = old.get((row["device"], row["rank"]))
        if prev is None:
            continue
        moved = [
            row[k] - prev[k]
            for k in ("nvlink_tx_bytes", "nvlink_rx_bytes")
            if row.get(k) is not None and prev.get(k) is not None
        ]
        if moved and seconds > 0:
            row["nvlink_bytes_per_s"] = sum(moved) / seconds
        if "compute_seconds" not in row or "compute_seconds" not in prev:
            continue
        compute = row["compute_seconds"] - prev["compute_seconds"]
        comm = row.get("communication_seconds", 0.0) - prev.get("communication_seconds", 0.0)
        if compute + comm > 0:
            row["communication_share"] = comm / (compute + comm)
    return now


def _bar(fraction: float | None, width: int = 20) -> Text:
    if fraction is None:
        return Text("-")
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    style = "red" if fraction > 0.9 else "yellow" if fraction > 0.6 else "green"
    return (
        Text("█" * filled, style=style)
        + Text("░" * (width - filled), style="dim")
        + Text(f" {fraction:4.0%}")
    )


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def render(snap: Snapshot, threshold: float = MonitorConfig.imbalance_threshold) -> Group:
    """The view of one snapshot: a header line and a table with one row per device and rank.

    Args:
        snap: what to show.
        threshold: imbalance ratio above which the header is highlighted.
    """
    header = Text(f"mgpu monitor  {snap.source}")
    if snap.requests:
        header += Text(
            f"   requests running {snap.requests.get('running', 0):.0f}"
            f"  waiting {snap.requests.get('waiting', 0):.0f}"
        )
    if snap.imbalance_ratio is not None:
        uneven = snap.warning or snap.imbalance_ratio > threshold
        style = "bold white on red" if uneven else "green"
        header += Text("   imbalance ")
        header += Text(f"{snap.imbalance_ratio:.2f}", style=style)
        if uneven:
            header += Text("  UNEVEN RANKS (see the server log)", style="bold red")
    if snap.communication_fraction is not None:
        header += Text(f"   in collectives {snap.communication_fraction:.0%}")
        if snap.transfer_fraction is not None:
            header += Text(f" (moving data {snap.transfer_fraction:.0%})")
    table = Table(show_edge=False, pad_edge=False)
    columns = ("rank", "device", "util", "mem GiB", "temp C", "power W", "NVLink GB/s")
    for column in (*columns, "compute | comm"):
        justify = "left" if column in ("device", "util") else "right"
        table.add_column(column, justify=justify, no_wrap=True)
    for row in snap.devices:
        share = row.get("communication_share")
        split = "-" if share is None else f"{1 - share:4.0%} | {share:4.0%}"
        temp, power = row.get("temperature_celsius"), row.get("power_watts")
        nvlink = row.get("nvlink_bytes_per_s")
        table.add_row(
            "-" if row["rank"] < 0 else str(row["rank"]),
            row["device"],
            _bar(row.get("utilization")),
            f"{_bytes(row.get('memory_used_bytes'))} / {_bytes(row.get('memory_total_bytes'))}",
            "-" if temp is None else f"{temp:.0f}",
            "-" if power is None else f"{power:.0f}",
            "-" if nvlink is None else f"{nvlink / 1e9:.1f}",
            split,
        )
    return Group(header, table)


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``monitor`` subcommand's flags.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--url", default=None, help="a running mgpu server (default: this host)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="show one snapshot and exit")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON snapshot (implies --once)"
    )


def run_monitor(args: argparse.Namespace) -> int:
    """``mgpu monitor``: the live view until Ctrl-C, or one snapshot with ``--once``.

    Args:
        args: parsed ``monitor`` flags.
    """
    if args.interval <= 0:
        raise SystemExit("mgpu monitor: --interval must be positive")
    console = Console()
    if args.once or args.json:
        snap = fetch(args.url)
        if args.json:
            print(json.dumps(snap.to_dict(), indent=2))
        else:
            console.print(render(snap))
        return 0
    previous = fetch(args.url)
    try:
        with Live(render(previous), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                snap = _since(fetch(args.url), previous)
                live.update(render(snap))
                previous = snap
    except KeyboardInterrupt:
        return 0
