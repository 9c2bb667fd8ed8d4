"""The engine's monitor: device telemetry and per-rank timings in one state, and the imbalance
warning.

A thread of the server process wakes every ``interval_s``: it samples the devices
(:mod:`mgpu.monitor.telemetry`), reads each rank's cumulative step timings
(:mod:`mgpu.monitor.timing`, carried by the step replies), and turns the timings of the last
``window_s`` into per-rank compute and communication rates, the imbalance ratio, the
communication fraction and the transfer fraction. ``/metrics`` and ``mgpu monitor`` read its
latest :class:`MonitorState`.

When the imbalance ratio stays above ``imbalance_threshold`` for ``warn_after_s`` the monitor logs
one warning naming the likely cause and the layout change to try, so a user without Prometheus
sees it too; it warns again only after the ratio has come back under the threshold. When the ranks
are even but moving data takes most of each step (the transfer fraction: time in collectives less
the waiting for slower peers, which is imbalance or jitter and no fault of the link), it names the
interconnect instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mgpu.monitor.telemetry import DeviceSample, DeviceSampler
from mgpu.monitor.timing import (
    RankTiming,
    RankWindow,
    communication_fraction,
    imbalance_ratio,
    transfer_fraction,
    window,
)

logger = logging.getLogger("mgpu.monitor")

#: A transfer fraction (collective time less waiting for peers, over step time) above this, with
#: the ranks even, points at the interconnect.
SLOW_LINK_FRACTION = 0.5


@dataclass(frozen=True)
class MonitorConfig:
    """How the server watches its devices and ranks.

    Attributes:
        telemetry_interval_s: seconds between two device samples (and timing reads).
        imbalance_window_s: seconds of step timings the imbalance ratio is computed over.
        imbalance_threshold: slowest rank's compute over the mean above which the layout counts
            as uneven (the alert rule uses the same number).
        imbalance_warn_after_s: seconds the imbalance must persist before the server logs it.
    """

    telemetry_interval_s: float = 1.0
    imbalance_window_s: float = 10.0
    imbalance_threshold: float = 1.25
    imbalance_warn_after_s: float = 60.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add one ``--telemetry-interval``-style flag per field to ``parser``."""
        g = parser.add_argument_group("monitoring")
        for f in dataclasses.fields(MonitorConfig):
            flag = "--" + f.name.removesuffix("_s").replace("_", "-")
            metavar = "SECONDS" if f.name.endswith("_s") else "RATIO"
            g.add_argument(
                flag,
                type=float,
                default=f.default,
                dest=f.name,
                metavar=metavar,
                help=_field_help(f.name).rstrip(".") + " (default: %(default)s)",
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> MonitorConfig:
        """The config from flags added by :meth:`add_arguments` (defaults where absent)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def _field_help(name: str) -> str:
    """The field's entry in the class docstring: the help text has one definition."""
    lines = (MonitorConfig.__doc__ or "").splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:"):
            text = [line.strip()[len(name) + 1 :].strip()]
            for cont in lines[i + 1 :]:
                if not cont.startswith(" " * 12):
                    break
                text.append(cont.strip())
            return " ".join(text)
    return ""


@dataclass
class MonitorState:
    """What the monitor knows now.

    Args:
        devices: the latest device samples, one per local rank.
        windows: each rank's compute, communication and idle time over the last window.
        totals: each rank's cumulative timings.
        imbalance_ratio: slowest rank's compute over the mean, over the window.
        communication_fraction: share of step time in collectives, over the window.
        imbalance_since: monotonic time the ratio went above the threshold, None while under it.
        slow_link_since: monotonic time the transfer fraction went above
            :data:`SLOW_LINK_FRACTION` with the ranks even, None while not.
        warning: the imbalance (or slow-link) warning while it stands, else None.
        transfer_fraction: share of step time moving data in collectives (waiting for peers
            left out), over the window.
    """

    devices: list[DeviceSample] = field(default_factory=list)
    windows: list[RankWindow] = field(default_factory=list)
    totals: dict[int, RankTiming] = field(default_factory=dict)
    imbalance_ratio: float = 1.0
    communication_fraction: float = 0.0
    imbalance_since: float | None = None
    slow_link_since: float | None = None
    warning: str | None = None
    transfer_fraction: float = 0.0


def explain_imbalance(
    windows: list[RankWindow],
    devices: list[DeviceSample],
    tp_size: int,
    pp_size: int,
) -> str:
    """One sentence naming the likely cause of an uneven step and the layout change to try.

    Args:
        windows: per-rank time over the window.
        devices: the latest device samples (throttle reasons, where NVML reports them).
        tp_size: tensor-parallel size of the layout.
        pp_size: pipeline-parallel size.
    """
    slowest = max(windows, key=lambda w: w.compute_s)
    mean = sum(w.compute_s for w in windows) / len(windows)
    ratio = slowest.compute_s / mean if mean > 0 else 1.0
    head = (
        f"rank {slowest.rank} computes {ratio:.2f}x the mean of all ranks, and the others wait "
        "for it in collectives"
    )
    throttled = [d for d in devices if d.rank == slowest.rank and d.throttle_reasons]
    if throttled:
        return (
            f"{head}: its device {throttled[0].device} is throttling its clocks "
            f"(NVML reasons 0x{throttled[0].throttle_reasons:x}); check its cooling and power "
            "limit, or give that rank less work"
        )
    stage = slowest.rank // tp_size
    if pp_size > 1:
        return (
            f"{head}: likely an uneven layer split or a slower device; move layers off "
            f"pipeline stage {stage} with --layer-split"
        )
    return (
        f"{head}: likely a slower or busier device (tensor-parallel shards are equal); put the "
        "ranks on equal devices, or use --pipeline-parallel-size with --layer-split to give the "
        "slow device fewer layers"
    )


def explain_slow_link(fraction: float, tp_size: int) -> str:
    """The warning for ranks that are even but spend most of a step moving data in collectives."""
    return (
        f"ranks spend {fraction:.0%} of each step moving data in collectives (not counting "
        "waits for slower peers): the interconnect is likely "
        f"too slow for tensor parallelism over {tp_size} ranks; try --pipeline-parallel-size "
        "(one hand-off per stage instead of two all-reduces per layer) or fewer TP ranks"
    )


class EngineMonitor:
    """Watches one engine's ranks (see the module docstring).

    Args:
        config: intervals and thresholds.
        read_timings: returns every rank's cumulative timings (``Executor.rank_timings``, fed
            by the step replies).
        sampler: samples the local ranks' devices, or None for no device telemetry.
        tp_size: tensor-parallel size of the engine's layout.
        pp_size: pipeline-parallel size.

    Threading: the monitor thread owns the history and replaces :attr:`state` whole; readers get
    one consistent state.
    """

    def __init__(
        self,
        config: MonitorConfig,
        read_timings: Callable[[], dict[int, RankTiming]],
        sampler: DeviceSampler | None,
        tp_size: int = 1,
        pp_size: int = 1,
    ):
        self.config = config
        self.read_timings = read_timings
        self.sampler = sampler
        self.tp_size, self.pp_size = tp_size, pp_size
        self.state = MonitorState()
        self._history: deque[tuple[float, dict[int, RankTiming]]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, now: float | None = None) -> MonitorState:
        """Take one sample of devices and timings and recompute the state."""
        now = time.monotonic() if now is None else now
        devices = self.sampler.sample_once() if self.sampler is not None else []
        totals = self.read_timings()
        self._history.append((now, totals))
        while (
            len(self._history) > 2 and now - self._history[1][0] >= self.config.imbalance_window_s
        ):
            self._history.popleft()
        then, old = self._history[0]
        windows = [
            window(rank, old.get(rank, RankTiming()), new, now - then)
            for rank, new in sorted(totals.items())
        ]
        active = [w for w in windows if w.steps > 0]
        ratio = imbalance_ratio(active) if len(active) > 1 else 1.0
        fraction = communication_fraction(active)
        transfer = transfer_fraction(active)
        previous = self.state
        since, link_since, warning = None, None, previous.warning
        if ratio > self.config.imbalance_threshold:
            since = now if previous.imbalance_since is None else previous.imbalance_since
            if warning is None and now - since >= self.config.imbalance_warn_after_s:
                warning = explain_imbalance(active, devices, self.tp_size, self.pp_size)
                logger.warning(
                    "imbalance ratio %.2f above %.2f for %.0f s: %s",
                    ratio,
                    self.config.imbalance_threshold,
                    now - since,
                    warning,
                )
        elif transfer > SLOW_LINK_FRACTION and len(active) > 1:
            link_since = now if previous.slow_link_since is None else previous.slow_link_since
            if warning is None and now - link_since >= self.config.imbalance_warn_after_s:
                warning = explain_slow_link(transfer, self.tp_size)
                logger.warning("%s", warning)
        elif warning is not None:
            logger.info("imbalance ratio back to %.2f, communication %.0f%%", ratio, fraction * 100)
            warning = None
        self.state = MonitorState(
            devices, windows, totals, ratio, fraction, since, link_since, warning, transfer
        )
        return self.state

    def start(self) -> None:
        """Start the monitor thread (a daemon; :meth:`stop` ends it)."""
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mgpu-monitor")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                self.update()
            except Exception:
                logger.debug("monitor update failed", exc_info=True)

    def stop(self) -> None:
        """End the monitor thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-able data (``mgpu monitor --json`` prints the same shape)."""
        s = self.state
        return {
            "devices": [d.to_dict() for d in s.devices],
            "ranks": [dataclasses.asdict(w) for w in s.windows],
            "imbalance_ratio": s.imbalance_ratio,
            "communication_fraction": s.communication_fraction,
            "transfer_fraction": s.transfer_fraction,
            "warning": s.warning,
        }
