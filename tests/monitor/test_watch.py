"""The monitor's state machine, settings and telemetry, on fake timings and real processes."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

import pytest
from rich.console import Console

from mgpu.monitor.telemetry import DeviceSample, DeviceSampler, local_samples
from mgpu.monitor.timing import RankTiming, RankWindow
from mgpu.monitor.view import parse_metrics, render
from mgpu.monitor.watch import EngineMonitor, MonitorConfig, explain_imbalance


class FakeRanks:
    """Cumulative timings of two ranks that advance by given per-second rates."""

    def __init__(self) -> None:
        self.totals = {0: RankTiming(), 1: RankTiming()}

    def advance(
        self,
        compute: tuple[float, float],
        comm: tuple[float, float],
        wait: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        for rank in (0, 1):
            t = self.totals[rank]
            step = compute[rank] + comm[rank]
            self.totals[rank] = RankTiming(
                t.step_s + step, t.comm_s + comm[rank], 0.0, t.steps + 10, t.wait_s + wait[rank]
            )

    def __call__(self) -> dict[int, RankTiming]:
        return dict(self.totals)


def _monitor(ranks: FakeRanks, **config: float) -> EngineMonitor:
    settings = {"imbalance_window_s": 3.0, "imbalance_warn_after_s": 5.0, **config}
    return EngineMonitor(MonitorConfig(**settings), ranks, sampler=None, tp_size=2, pp_size=1)


def test_persistent_imbalance_is_warned_once_and_clears(caplog: pytest.LogCaptureFixture) -> None:
    ranks = FakeRanks()
    monitor = _monitor(ranks)
    monitor.update(now=0.0)
    with caplog.at_level(logging.WARNING, logger="mgpu.monitor"):
        for t in range(1, 12):
            ranks.advance(compute=(0.2, 0.6), comm=(0.5, 0.1))
            state = monitor.update(now=float(t))
            assert state.imbalance_ratio == pytest.approx(0.6 / 0.4)
            assert (state.warning is not None) == (t >= 6)  # above since t=1, warned 5 s later
    warnings = [r for r in caplog.records if "imbalance ratio" in r.getMessage()]
    assert len(warnings) == 1
    assert "rank 1 computes 1.50x" in warnings[0].getMessage()
    for t in range(12, 18):  # the split evens out: the warning clears once the window has
        ranks.advance(compute=(0.4, 0.4), comm=(0.1, 0.1))
        state = monitor.update(now=float(t))
    assert state.imbalance_ratio == pytest.approx(1.0)
    assert state.warning is None and state.imbalance_since is None


def test_an_even_split_with_a_busy_link_is_named_as_the_link() -> None:
    ranks = FakeRanks()
    monitor = _monitor(ranks, imbalance_warn_after_s=2.0)
    monitor.update(now=0.0)
    for t in range(1, 5):
        ranks.advance(compute=(0.2, 0.2), comm=(0.6, 0.6))
        state = monitor.update(now=float(t))
    assert state.imbalance_ratio == pytest.approx(1.0)
    assert state.communication_fraction == pytest.approx(0.75)
    assert state.transfer_fraction == pytest.approx(0.75)
    assert state.warning is not None and "interconnect" in state.warning


def test_waiting_for_peers_is_not_named_as_the_link(caplog: pytest.LogCaptureFixture) -> None:
    """CPU ranks sharing loaded cores: even compute, 75% of each step in collectives, but almost
    all of it waiting for the other rank to be scheduled (the least-waiting rank moved data for
    only a twelfth of it). That is jitter, not a slow interconnect: no warning."""
    ranks = FakeRanks()
    monitor = _monitor(ranks, imbalance_warn_after_s=2.0)
    monitor.update(now=0.0)
    with caplog.at_level(logging.WARNING, logger="mgpu.monitor"):
        for t in range(1, 8):
            ranks.advance(compute=(0.2, 0.2), comm=(0.6, 0.6), wait=(0.55, 0.55))
            state = monitor.update(now=float(t))
    assert state.communication_fraction == pytest.approx(0.75)
    assert state.transfer_fraction == pytest.approx(0.0625)
    assert state.warning is None and state.slow_link_since is None
    assert not caplog.records


def test_explanations_name_the_cause_and_the_change() -> None:
    windows = [RankWindow(0, 1, 0.2, 0.5, 0, 5), RankWindow(1, 1, 0.6, 0.1, 0, 5)]
    pipeline = explain_imbalance(windows, [], tp_size=1, pp_size=2)
    assert "pipeline stage 1" in pipeline and "--layer-split" in pipeline
    hot = DeviceSample(1, "cuda:1", 1.0, 1, 2, throttle_reasons=0x20)
    throttled = explain_imbalance(windows, [hot], tp_size=2, pp_size=1)
    assert "cuda:1 is throttling" in throttled and "0x20" in throttled


def test_config_flags_come_from_the_dataclass() -> None:
    parser = argparse.ArgumentParser()
    MonitorConfig.add_arguments(parser)
    args = parser.parse_args(["--telemetry-interval", "0.5", "--imbalance-threshold", "1.5"])
    config = MonitorConfig.from_cli_args(args)
    assert config == MonitorConfig(telemetry_interval_s=0.5, imbalance_threshold=1.5)
    assert "slowest rank" in parser.format_help() and "(default: 1.25)" in parser.format_help()
    with pytest.raises(ValueError, match="telemetry_interval_s"):
        MonitorConfig(telemetry_interval_s=0)


def test_cpu_sampler_reads_each_worker_process() -> None:
    code = "x = bytearray(64 * 2**20)\nwhile True: sum(range(10**5))"
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        sampler = DeviceSampler("cpu", {3: busy.pid, 4: os.getpid()}, interval_s=0.2)
        sampler.start()
        time.sleep(1.0)
        sampler.stop()
        samples = {s.rank: s for s in sampler.samples}
    finally:
        busy.kill()
        busy.wait()
    assert set(samples) == {3, 4}
    worker = samples[3]
    assert worker.device == "cpu" and worker.pid == busy.pid
    assert worker.memory_used_bytes > 64 * 2**20
    assert worker.memory_total_bytes > worker.memory_used_bytes
    assert 0.05 < worker.utilization <= 1.0  # a busy loop, on a loaded machine
    assert local_samples()[0].memory_total_bytes > 0


def test_view_parses_and_renders_a_scrape() -> None:
    text = "\n".join(
        [
            'mgpu_device_utilization_ratio{device="cuda:0",model_name="m",rank="0"} 0.95',
            'mgpu_device_utilization_ratio{device="cuda:1",model_name="m",rank="1"} 0.6',
            'mgpu_device_memory_used_bytes{device="cuda:0",model_name="m",rank="0"} 2e9',
            'mgpu_device_compute_seconds_total{device="cuda:0",model_name="m",rank="0"} 3',
            'mgpu_device_communication_seconds_total{device="cuda:0",model_name="m",rank="0"} 1',
            'mgpu_device_imbalance_ratio{model_name="m"} 1.6',
            'mgpu_communication_fraction{model_name="m"} 0.57',
            'mgpu_transfer_fraction{model_name="m"} 0.06',
            'mgpu_imbalance_warning{model_name="m"} 1',
            'mgpu_num_requests_running{model_name="m"} 2',
            "",
        ]
    )
    snap = parse_metrics(text, "http://x")
    assert [(d["device"], d["rank"]) for d in snap.devices] == [("cuda:0", 0), ("cuda:1", 1)]
    assert snap.devices[0]["communication_share"] == pytest.approx(0.25)
    assert snap.imbalance_ratio == 1.6 and snap.warning
    console = Console(width=200, record=True)
    console.print(render(snap))
    out = console.export_text()
    assert "UNEVEN RANKS" in out and "cuda:1" in out and "75% |  25%" in out
    assert "in collectives 57% (moving data 6%)" in out and snap.transfer_fraction == 0.06
