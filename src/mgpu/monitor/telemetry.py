"""Device telemetry: what each rank's device is doing, sampled in the background.

On NVIDIA GPUs the numbers come from NVML (``nvidia-ml-py``, the ``gpu`` extra): utilisation,
memory used and total (a rank's memory is its device's, not the host process's), temperature,
power, SM clock, throttle reasons, PCIe throughput and NVLink traffic where the driver reports
them. For CPU
workers they come from ``psutil``: each worker process's CPU utilisation (over the cores it is
pinned to) and resident memory against the host's.

Sampling costs a few system calls per rank per interval on a thread of the engine's process; the
workers never see it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

logger = logging.getLogger("mgpu.monitor")


@dataclass(frozen=True)
class DeviceSample:
    """One device of one rank at one moment.

    Args:
        rank: global rank (-1 for a device no rank runs on, as in ``mgpu monitor`` locally).
        device: ``cuda:<index>``, or ``cpu`` for a CPU worker.
        utilization: busy share of the device (0..1); for a CPU worker, of its pinned cores.
        memory_used_bytes: device memory in use (CPU: the worker's resident set).
        memory_total_bytes: device memory in all (CPU: the host's).
        temperature_celsius: device temperature, None where unknown.
        power_watts: power draw, None where unknown.
        sm_clock_mhz: current SM clock (NVML only).
        throttle_reasons: NVML's bit mask of active clock throttle reasons (0: none).
        pcie_tx_bytes_per_s: PCIe transmit throughput (NVML only).
        pcie_rx_bytes_per_s: PCIe receive throughput (NVML only).
        pid: the worker process, when known.
        nvlink_tx_bytes: NVLink data transmitted over all the device's links since the driver
            loaded (NVML only, where the driver reports it; a counter: rates come from two
            samples).
        nvlink_rx_bytes: NVLink data received, likewise.
    """

    rank: int
    device: str
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_celsius: float | None = None
    power_watts: float | None = None
    sm_clock_mhz: float | None = None
    throttle_reasons: int | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    pid: int | None = None
    nvlink_tx_bytes: int | None = None
    nvlink_rx_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The sample as plain JSON-able data."""
        return asdict(self)


def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None without NVML (no driver, no package)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _visible_cuda_indices() -> list[int] | None:
    """NVML indices of the devices CUDA numbers 0, 1, … (``CUDA_VISIBLE_DEVICES``), or None."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:  # UUIDs: NVML's order is the best guess
        return None


def _optional(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # the driver does not report it on this device
        return None


#: ``scopeId`` of an NVML field summed over all of a device's NVLinks.
_ALL_LINKS = 0xFFFFFFFF
#: Attribute of ``c_nvmlValue_t`` for each ``NVML_VALUE_TYPE_*``.
_VALUE_ATTRS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal"}


def _nvlink_bytes(nv: Any, handle: Any) -> tuple[int | None, int | None]:
    """(transmitted, received) NVLink data bytes of a device over all its links, or None each.

    NVML's ``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX`` fields are cumulative KiB counters, read
    here with the scope of all links; a device without NVLink, or a driver without the fields,
    answers with an error per field (or for the call), and the counters are then None.
    """
    fields = [
        (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
        (nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS),
    ]
    values = _optional(lambda: nv.nvmlDeviceGetFieldValues(handle, fields))
    if values is None:
        return None, None
    out = []
    for v in values:
        attr = _VALUE_ATTRS.get(int(v.valueType))
        ok = v.nvmlReturn == nv.NVML_SUCCESS and attr is not None
        out.append(int(getattr(v.value, attr)) * 1024 if ok else None)  # KiB -> bytes
    return out[0], out[1]


class NvmlReader:
    """Reads NVIDIA devices through NVML.

    Args:
        nvml: the initialised ``pynvml`` module.
    """

    def __init__(self, nvml: Any):
        self.nvml = nvml
        self.count = nvml.nvmlDeviceGetCount()
        self.visible = _visible_cuda_indices()

    def sample(self, cuda_index: int, rank: int, pid: int | None = None) -> DeviceSample:
        """Sample the device CUDA calls ``cuda_index``, on behalf of ``rank``."""
        nv = self.nvml
        index = self.visible[cuda_index] if self.visible else cuda_index
        h = nv.nvmlDeviceGetHandleByIndex(index)
        memory = nv.nvmlDeviceGetMemoryInfo(h)
        util = _optional(lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
        power = _optional(lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
        throttle = _optional(lambda: int(nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)))
        tx = _optional(lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES))
        rx = _optional(lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES))
        nvlink_tx, nvlink_rx = _nvlink_bytes(nv, h)
        return DeviceSample(
            rank=rank,
            device=f"cuda:{cuda_index}",
            utilization=util or 0.0,
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            temperature_celsius=_optional(
                lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            ),
            power_watts=power,
            sm_clock_mhz=_optional(lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))),
            throttle_reasons=throttle,
            pcie_tx_bytes_per_s=None if tx is None else tx * 1024.0,  # NVML reports KB/s
            pcie_rx_bytes_per_s=None if rx is None else rx * 1024.0,
            pid=pid,
            nvlink_tx_bytes=nvlink_tx,
            nvlink_rx_bytes=nvlink_rx,
        )


def _cpu_temperature() -> float | None:
    """The hottest CPU package sensor psutil finds, or None (no sensors, as in most VMs)."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        readings = [t.current for entries in read().values() for t in entries if t.current]
    except Exception:
        return None
    return max(readings) if readings else None


class DeviceSampler:
    """Samples the device of every rank in the background.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
        ranks: global rank -> worker pid; ranks on other nodes are not listed (their devices are
            another host's).
        interval_s: seconds between two samples.
        cuda_device_count: on CUDA, devices per host (a rank uses ``rank % count``).

    Threading: the sampling thread owns the readers and replaces :attr:`samples` whole; readers
    of :attr:`samples` get one consistent list.
    """

    def __init__(
        self,
        device_type: str,
        ranks: dict[int, int],
        interval_s: float = 1.0,
        cuda_device_count: int = 1,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.device_type = device_type
        self.ranks = ranks
        self.interval_s = interval_s
        self.cuda_device_count = max(1, cuda_device_count)
        self.samples: list[DeviceSample] = []
        self.nvml = None
        if device_type == "cuda":
            nvml = _nvml()
            if nvml is None:
                logger.warning(
                    "NVML is not available: GPU telemetry is off (pip install mgpu[gpu])"
                )
            else:
                self.nvml = NvmlReader(nvml)
        self._procs: dict[int, tuple[psutil.Process, int]] = {}
        if device_type == "cpu":
            for rank, pid in ranks.items():
                try:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # the first call only starts the interval
                    cores = len(proc.cpu_affinity()) if hasattr(proc, "cpu_affinity") else 0
                    self._procs[rank] = (proc, cores or psutil.cpu_count() or 1)
                except psutil.Error:
                    continue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> list[DeviceSample]:
        """Sample every rank's device now; also stored in :attr:`samples`."""
        out = []
        for rank, pid in sorted(self.ranks.items()):
            if self.device_type == "cuda":
                if self.nvml is not None:
                    out.append(self.nvml.sample(rank % self.cuda_device_count, rank, pid))
                continue
            if rank not in self._procs:
                continue
            proc, ncores = self._procs[rank]
            try:
                with proc.oneshot():
                    cpu = proc.cpu_percent(None) / 100.0
                    rss = proc.memory_info().rss
            except psutil.Error:  # the worker has exited; the executor reports it
                continue
            out.append(
                DeviceSample(
                    rank=rank,
                    device="cpu",
                    utilization=min(1.0, cpu / ncores),
                    memory_used_bytes=int(rss),
                    memory_total_bytes=int(psutil.virtual_memory().total),
                    temperature_celsius=_cpu_temperature(),
                    pid=pid,
                )
            )
        self.samples = out
        return out

    def start(self) -> None:
        """Start the sampling thread (a daemon; :meth:`stop` ends it)."""
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mgpu-telemetry")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_once()
            except Exception:
                logger.debug("telemetry sample failed", exc_info=True)

    def stop(self) -> None:
        """End the sampling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def local_samples() -> list[DeviceSample]:
    """This host's devices now, without an engine: every NVIDIA GPU, else the CPU as a whole."""
    nvml = _nvml()
    if nvml is not None:
        reader = NvmlReader(nvml)
        reader.visible = None
        return [reader.sample(i, -1) for i in range(reader.count)]
    psutil.cpu_percent(None)
    time.sleep(0.2)
    memory = psutil.virtual_memory()
    return [
        DeviceSample(
            rank=-1,
            device="cpu",
            utilization=psutil.cpu_percent(None) / 100.0,
            memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total),
            temperature_celsius=_cpu_temperature(),
        )
    ]
