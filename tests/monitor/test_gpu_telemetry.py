"""CUDA-event step timing and NVML telemetry on a real GPU (skipped without one), and the
reading of NVML's answers (NVLink counters above all) through a stand-in for ``pynvml`` that
answers as the library does: the same function names, field structures and error codes."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mgpu.monitor.telemetry import DeviceSample, DeviceSampler, NvmlReader, local_samples
from mgpu.monitor.timing import RankTimer
from mgpu.monitor.view import _since, parse_metrics
from mgpu.monitor.watch import MonitorState
from mgpu.server.metrics import _EngineCollector

NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, ULL = 0, 3, 3
TX, RX = 138, 139  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX / _RX


class FakeNvml:
    """Two devices: 0 has NVLink (counters in KiB, as NVML keeps them), 1 answers NOT_SUPPORTED
    for the NVLink fields, as a PCIe-only GPU does."""

    NVML_SUCCESS = NVML_SUCCESS
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = TX, RX
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    def __init__(self) -> None:
        self.kib = {TX: 1000, RX: 3000}
        self.scopes: list[int] = []

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=2 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=90)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 300_000

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: int) -> int:
        return 0

    def nvmlDeviceGetPcieThroughput(self, h: int, counter: int) -> int:
        return 100

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 60

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        return 1980

    def nvmlDeviceGetFieldValues(self, h: int, fields: list[tuple[int, int]]) -> list[Any]:
        out = []
        for field_id, scope in fields:
            self.scopes.append(scope)
            ok = h == 0 and field_id in self.kib
            value = SimpleNamespace(ullVal=self.kib.get(field_id, 0) if ok else 0)
            ret = NVML_SUCCESS if ok else NVML_ERROR_NOT_SUPPORTED
            out.append(SimpleNamespace(valueType=ULL, nvmlReturn=ret, value=value))
        return out


def test_nvlink_counters_are_read_over_all_links_in_bytes() -> None:
    nv = FakeNvml()
    reader = NvmlReader(nv)
    reader.visible = None
    linked, pcie_only = reader.sample(0, 0), reader.sample(1, 1)
    assert (linked.nvlink_tx_bytes, linked.nvlink_rx_bytes) == (1000 * 1024, 3000 * 1024)
    assert set(nv.scopes) == {0xFFFFFFFF}  # NVML's scope "all links", not link 0 alone
    assert pcie_only.nvlink_tx_bytes is None and pcie_only.nvlink_rx_bytes is None
    assert linked.pcie_tx_bytes_per_s == 100 * 1024  # PCIe: NVML's KB/s


def test_nvlink_counters_become_series_and_a_rate_in_the_view() -> None:
    samples = [
        DeviceSample(0, "cuda:0", 0.9, 1, 2, nvlink_tx_bytes=4 * 10**9, nvlink_rx_bytes=10**9),
        DeviceSample(1, "cuda:1", 0.9, 1, 2),
    ]
    executor = SimpleNamespace(reports=[], local=SimpleNamespace(ranks=[]), procs=[], world_size=0)
    metrics = SimpleNamespace(
        engine=SimpleNamespace(executor=executor),
        model_name="m",
        healthy=True,
        monitor=SimpleNamespace(state=MonitorState(devices=samples)),
    )
    families = {f.name: f for f in _EngineCollector(metrics)._devices()}  # type: ignore[arg-type]
    tx = families["mgpu_device_nvlink_tx_bytes"]
    assert tx.type == "counter"
    assert [(s.name, s.labels["rank"], s.value) for s in tx.samples] == [
        ("mgpu_device_nvlink_tx_bytes_total", "0", 4e9)  # rank 1 has no NVLink: no series
    ]
    line = 'mgpu_device_nvlink_{}_bytes_total{{device="cuda:0",model_name="m",rank="0"}} {}\n'
    before = parse_metrics(line.format("tx", 4e9) + line.format("rx", 1e9), "x")
    now = parse_metrics(line.format("tx", 7e9) + line.format("rx", 2e9), "x")
    before.taken_at, now.taken_at = 10.0, 12.0
    (row,) = _since(now, before).devices
    assert row["nvlink_bytes_per_s"] == pytest.approx(2e9)  # 4 GB over 2 s
    alone = parse_metrics(line.format("tx", 7e9), "x")  # one snapshot: no rate yet
    assert "nvlink_bytes_per_s" not in _since(alone, None).devices[0]


@pytest.mark.gpu
def test_cuda_events_split_compute_from_collectives() -> None:
    timer = RankTimer()
    timer.use_cuda(True)
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        timer.begin_step()
        b = a @ a  # compute
        with timer.collective():
            c = b @ b  # stands in for an all-reduce: device time between two events
        timer.end_step()
    torch.cuda.synchronize()
    timer.begin_step()
    timer.end_step()  # resolves the completed events
    t = timer.snapshot()
    assert t.steps == 4
    assert t.comm_s > 0 and t.compute_s > 0
    assert t.comm_s == pytest.approx(t.compute_s, rel=0.5)  # the same matmul on either side
    del c


@pytest.mark.gpu
def test_nvml_reports_the_device_of_a_rank() -> None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py not installed (pip install mgpu[gpu])")
    sampler = DeviceSampler("cuda", {0: os.getpid()}, cuda_device_count=torch.cuda.device_count())
    (sample,) = sampler.sample_once()
    free, total = torch.cuda.mem_get_info(0)
    assert sample.device == "cuda:0" and sample.rank == 0
    assert sample.memory_total_bytes == pytest.approx(total, rel=0.01)
    assert sample.memory_used_bytes == pytest.approx(total - free, rel=0.1, abs=256 * 2**20)
    assert sample.temperature_celsius is not None and 0 < sample.temperature_celsius < 120
    assert 0 <= sample.utilization <= 1
    assert len(local_samples()) == torch.cuda.device_count()


@pytest.mark.gpu
def test_nvml_nvlink_counters_where_the_driver_reports_them() -> None:
    """On a real device: NVLink counters are None (no NVLink) or bytes that never go back."""
    pytest.importorskip("pynvml", reason="nvidia-ml-py not installed (pip install mgpu[gpu])")
    sampler = DeviceSampler("cuda", {0: os.getpid()}, cuda_device_count=torch.cuda.device_count())
    (first,) = sampler.sample_once()
    if torch.cuda.device_count() > 1:
        x = torch.ones(64 * 2**20, device="cuda:0")
        for _ in range(10):
            x.to("cuda:1")
        torch.cuda.synchronize()
    (second,) = sampler.sample_once()
    for name in ("nvlink_tx_bytes", "nvlink_rx_bytes"):
        a, b = getattr(first, name), getattr(second, name)
        assert (a is None) == (b is None), name
        assert a is None or 0 <= a <= b, name
