"""CUDA-event step timing and NVML telemetry on a real GPU (skipped without one)."""

from __future__ import annotations

import os

import pytest
import torch

from mgpu.monitor.telemetry import DeviceSampler, local_samples
from mgpu.monitor.timing import RankTimer


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
