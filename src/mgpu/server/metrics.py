"""Prometheus metrics of one server, through ``prometheus_client``.

Request metrics take the names vLLM gives them, under the ``mgpu_`` prefix (``vllm:x`` becomes
``mgpu_x``; the table is in ``docs/serving.md``), so a vLLM dashboard ports by renaming the
prefix. Per-device series carry ``device`` and ``rank`` labels; ``mgpu_device_imbalance_ratio``,
``mgpu_communication_fraction`` and ``mgpu_transfer_fraction`` come from the ranks' own step timings
(:mod:`mgpu.monitor.timing`). Base units (seconds, bytes, a 0..1 ratio), ``_total`` on counters,
histograms for latencies.

Gauges and the engine's counters are read when scraped; latencies are recorded by the HTTP
handlers and the engine; device and rank series come from the server's
:class:`~mgpu.monitor.watch.EngineMonitor`, which samples in the background. Each app owns its
:class:`Metrics` and its registry, so two servers in one process never mix their series.

Example scrape (abridged)::

    mgpu_num_requests_running{model_name="demo"} 3.0
    mgpu_time_to_first_token_seconds_bucket{le="0.05",model_name="demo"} 12.0
    mgpu_device_memory_used_bytes{device="cuda:1",model_name="demo",rank="1"} 3.1e+09
    mgpu_device_imbalance_ratio{model_name="demo"} 1.04
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mgpu.engine.llm_engine import LLMEngine
from mgpu.monitor.telemetry import DeviceSampler
from mgpu.monitor.watch import EngineMonitor, MonitorConfig

logger = logging.getLogger("mgpu.server")

# ``_created`` series double every counter and histogram and no dashboard reads them.
prometheus_client.disable_created_metrics()

#: Bucket upper bounds (seconds) of the latency histograms: 5 ms to 10 minutes.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
#: Bucket upper bounds (seconds) of the inter-token latency: 1 ms to 80 s.
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class Metrics:
    """The metrics of one server.

    Args:
        engine: the engine whose gauges and counters are read at scrape time.
        model_name: the ``model_name`` label of every series.
        monitor_config: device sampling interval and imbalance thresholds.
    """

    def __init__(
        self, engine: LLMEngine, model_name: str, monitor_config: MonitorConfig | None = None
    ):
        self.engine = engine
        self.model_name = model_name
        self.healthy = True
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, help_: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(name, help_, labels, buckets=buckets, registry=self.registry)
            return metric.labels(model_name)

        self.time_to_first_token = histogram(
            "mgpu_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            LATENCY_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "mgpu_inter_token_latency_seconds",
            "Time between two generated tokens of one request.",
            INTER_TOKEN_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "mgpu_e2e_request_latency_seconds",
            "Time from request arrival to its end.",
            LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "mgpu_request_queue_time_seconds",
            "Time a sequence waited from arrival to its first step.",
            LATENCY_BUCKETS,
        )
        self.request_success = Counter(
            "mgpu_request_success",
            "Requests ended, by finish reason (stop, length, abort, error).",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.monitor = _start_monitor(engine, monitor_config or MonitorConfig())
        self.registry.register(_EngineCollector(self))
        engine.queue_time_listeners.append(self.request_queue_time.observe)

    def record_first_token(self, seconds: float) -> None:
        """A request produced its first token ``seconds`` after it arrived."""
        self.time_to_first_token.observe(seconds)

    def record_inter_token(self, seconds: float, num_tokens: int = 1) -> None:
        """``num_tokens`` tokens of one request arrived ``seconds`` after its previous ones."""
        for _ in range(num_tokens):
            self.inter_token_latency.observe(seconds / num_tokens)

    def record_finished(self, seconds: float, finish_reason: str) -> None:
        """A request ended (``stop``, ``length``, ``abort`` or ``error``) after ``seconds``."""
        self.e2e_request_latency.observe(seconds)
        self.request_success.labels(self.model_name, finish_reason).inc()

    def render(self, healthy: bool) -> str:
        """The whole scrape body (text format 0.0.4).

        Args:
            healthy: whether the engine and all its workers are up.
        """
        self.healthy = healthy
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Stop the monitor thread."""
        self.monitor.stop()


def _start_monitor(engine: LLMEngine, config: MonitorConfig) -> EngineMonitor:
    """The engine's monitor, sampling the local ranks' devices, started."""
    executor = engine.executor
    pids = {rank: proc.pid for rank, proc in zip(executor.local.ranks, executor.procs, strict=True)}
    cuda_count = 1
    if engine.device == "cuda":
        import torch

        cuda_count = torch.cuda.device_count()
    sampler = DeviceSampler(engine.device, pids, config.telemetry_interval_s, cuda_count)
    parallel = engine.parallel_config
    monitor = EngineMonitor(
        config,
        executor.rank_timings,
        sampler,
        parallel.tensor_parallel_size,
        parallel.pipeline_parallel_size,
    )
    monitor.update()
    monitor.start()
    return monitor


class _EngineCollector(Collector):
    """Reads the engine's gauges and counters and the monitor's state at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        engine, name = m.engine, m.model_name
        blocks, stats = engine.block_manager, engine.stats

        def gauge(metric: str, help_: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, help_, labels=["model_name"])
            family.add_metric([name], value)
            return family

        def counter(metric: str, help_: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, help_, labels=["model_name"])
            family.add_metric([name], value)
            return family

        yield gauge("mgpu_engine_healthy", "1 while every worker is alive.", int(m.healthy))
        yield gauge(
            "mgpu_num_requests_running",
            "Sequences in the running batch (a request with n > 1 counts n).",
            len(engine.scheduler.running),
        )
        yield gauge(
            "mgpu_num_requests_waiting",
            "Sequences queued for admission (new or pre-empted).",
            len(engine.scheduler.waiting),
        )
        yield gauge(
            "mgpu_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", blocks.usage
        )
        yield gauge(
            "mgpu_kv_cache_free_blocks",
            "KV-cache blocks held by no sequence.",
            blocks.num_free_blocks,
        )
        yield gauge("mgpu_kv_cache_blocks", "KV-cache blocks in all.", blocks.num_blocks)
        yield counter(
            "mgpu_num_preemptions",
            "Sequences pre-empted (blocks freed, recomputed later) for lack of KV cache.",
            stats.num_preemptions,
        )
        yield counter(
            "mgpu_prompt_tokens",
            "Prompt tokens prefilled, each counted once.",
            stats.prompt_tokens_total,
        )
        yield counter(
            "mgpu_recomputed_tokens",
            "Tokens prefilled again to resume pre-empted sequences.",
            stats.recomputed_tokens_total,
        )
        yield counter(
            "mgpu_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries_total,
        )
        yield counter(
            "mgpu_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed again).",
            stats.prefix_cache_hits_total,
        )
        yield counter("mgpu_generation_tokens", "Tokens generated.", stats.generation_tokens_total)
        yield from self._devices()

    def _devices(self) -> Iterator[Metric]:
        m = self.metrics
        engine, name = m.engine, m.model_name
        state = m.monitor.state
        reports = {r.rank: r.device for r in engine.executor.reports}
        labels = ["model_name", "device", "rank"]

        def family(metric: str, help_: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(metric, help_, labels=labels)

        gauges = {
            "utilization": family(
                "mgpu_device_utilization_ratio",
                "Busy share of the rank's device (0..1; CPU: of the worker's pinned cores).",
            ),
            "memory_used_bytes": family(
                "mgpu_device_memory_used_bytes",
                "Device memory in use (CPU: the worker's resident set).",
            ),
            "memory_total_bytes": family(
                "mgpu_device_memory_total_bytes",
                "Device memory in all (CPU: the host's).",
            ),
            "temperature_celsius": family("mgpu_device_temperature_celsius", "Device temperature."),
            "power_watts": family("mgpu_device_power_watts", "Power draw."),
            "sm_clock_mhz": family("mgpu_device_sm_clock_hertz", "Current SM clock (NVML)."),
            "throttle_reasons": family(
                "mgpu_device_clock_throttle_reasons",
                "NVML bit mask of active clock throttle reasons (0: none).",
            ),
            "pcie_tx_bytes_per_s": family(
                "mgpu_device_pcie_tx_bytes_per_second",
                "PCIe transmit throughput (NVML).",
            ),
            "pcie_rx_bytes_per_s": family(
                "mgpu_device_pcie_rx_bytes_per_second",
                "PCIe receive throughput (NVML).",
            ),
        }
        nvlink = {
            "nvlink_tx_bytes": CounterMetricFamily(
                "mgpu_device_nvlink_tx_bytes",
                "NVLink data transmitted over all the device's links (NVML, where reported).",
                labels=labels,
            ),
            "nvlink_rx_bytes": CounterMetricFamily(
                "mgpu_device_nvlink_rx_bytes",
                "NVLink data received over all the device's links (NVML, where reported).",
                labels=labels,
            ),
        }
        for sample in state.devices:
            values = sample.to_dict()
            key = [name, reports.get(sample.rank, sample.device), str(sample.rank)]
            for field_name, fam in [*gauges.items(), *nvlink.items()]:
                value = values[field_name]
                if value is not None:
                    scale = 1e6 if field_name == "sm_clock_mhz" else 1.0
                    fam.add_metric(key, float(value) * scale)
        yield from gauges.values()
        yield from nvlink.values()

        up = GaugeMetricFamily(
            "mgpu_rank_up", "1 while the rank's worker runs (0: down).", labels=labels
        )
        procs = dict(zip(engine.executor.local.ranks, engine.executor.procs, strict=True))
        for rank in range(engine.executor.world_size):
            proc = procs.get(rank)
            alive = m.healthy and (proc is None or proc.poll() is None)
            up.add_metric([name, reports.get(rank, "?"), str(rank)], int(alive))
        yield up

        counters = {
            "compute_s": ("mgpu_device_compute_seconds", "Seconds the rank computed in steps."),
            "comm_s": (
                "mgpu_device_communication_seconds",
                "Seconds the rank spent in collectives (all-reduce, gather, send/recv).",
            ),
            "wait_s": (
                "mgpu_device_collective_wait_seconds",
                "Part of the communication seconds spent waiting for a slower peer or stage.",
            ),
            "idle_s": ("mgpu_device_idle_seconds", "Seconds the rank waited between steps."),
            "steps": ("mgpu_device_steps", "Steps the rank ran."),
        }
        families = {k: CounterMetricFamily(n, h, labels=labels) for k, (n, h) in counters.items()}
        for rank, timing in sorted(state.totals.items()):
            key = [name, reports.get(rank, "?"), str(rank)]
            families["compute_s"].add_metric(key, timing.compute_s)
            families["comm_s"].add_metric(key, timing.comm_s)
            families["wait_s"].add_metric(key, timing.wait_s)
            families["idle_s"].add_metric(key, timing.idle_s)
            families["steps"].add_metric(key, timing.steps)
        yield from families.values()

        ratio = GaugeMetricFamily(
            "mgpu_device_imbalance_ratio",
            "Slowest rank's compute over the mean of all ranks, over the monitor's window.",
            labels=["model_name"],
        )
        ratio.add_metric([name], state.imbalance_ratio)
        yield ratio
        fraction = GaugeMetricFamily(
            "mgpu_communication_fraction",
            "Share of the ranks' step time spent in collectives, over the monitor's window.",
            labels=["model_name"],
        )
        fraction.add_metric([name], state.communication_fraction)
        yield fraction
        transfer = GaugeMetricFamily(
            "mgpu_transfer_fraction",
            "Share of the ranks' step time moving data in collectives, waits for slower peers "
            "left out (what a slow interconnect raises), over the monitor's window.",
            labels=["model_name"],
        )
        transfer.add_metric([name], state.transfer_fraction)
        yield transfer
        warn = GaugeMetricFamily(
            "mgpu_imbalance_warning",
            "1 while the server's imbalance or slow-link warning stands.",
            labels=["model_name"],
        )
        warn.add_metric([name], int(state.warning is not None))
        yield warn
