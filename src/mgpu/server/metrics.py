"""Prometheus metrics of one server, in the text exposition format (version 0.0.4).

Names follow Prometheus conventions: the ``mgpu_`` prefix, base units (seconds, a 0..1 ratio),
``_total`` on counters, histograms for latencies. Gauges and the engine's own counters are read
from the engine when scraped; latencies are recorded by the HTTP handlers. Each app owns its
:class:`Metrics`, so two servers in one process never mix their series.

Example scrape (abridged)::

    # HELP mgpu_num_requests_running Sequences in the running batch (a request with n > 1 counts n).
    # TYPE mgpu_num_requests_running gauge
    mgpu_num_requests_running{model_name="demo"} 3
    # TYPE mgpu_time_to_first_token_seconds histogram
    mgpu_time_to_first_token_seconds_bucket{model_name="demo",le="0.05"} 12
    ...
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from dataclasses import dataclass, field

from mgpu.engine.llm_engine import LLMEngine

#: Bucket upper bounds (seconds) of the latency histograms: 5 ms to 10 minutes.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip


@dataclass
class Histogram:
    """A cumulative histogram with fixed buckets.

    Args:
        buckets: increasing upper bounds; ``+Inf`` is implied.
    """

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        """Sample lines: cumulative ``_bucket`` series, then ``_sum`` and ``_count``."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{_number(bound)}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {_number(self.total)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    """The metrics of one server.

    Args:
        engine: the engine whose gauges and counters are read at scrape time.
        model_name: the ``model_name`` label of every series.
    """

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.labels = f'model_name="{_escape(model_name)}"'
        self.time_to_first_token = Histogram()
        self.request_latency = Histogram()
        self.finished: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record_first_token(self, seconds: float) -> None:
        """A request produced its first token ``seconds`` after it arrived."""
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def record_finished(self, seconds: float, finish_reason: str) -> None:
        """A request ended (``stop``, ``length``, ``abort`` or ``error``) after ``seconds``."""
        with self._lock:
            self.request_latency.observe(seconds)
            self.finished[finish_reason] += 1

    def render(self, healthy: bool) -> str:
        """The whole scrape body.

        Args:
            healthy: whether the engine and all its workers are up.
        """
        engine, labels = self.engine, self.labels
        blocks = engine.block_manager
        stats = engine.stats
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float) -> None:
            out.extend(
                [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
            )

        metric("mgpu_engine_healthy", "gauge", "1 while every worker is alive.", int(healthy))
        metric(
            "mgpu_num_requests_running",
            "gauge",
            "Sequences in the running batch (a request with n > 1 counts n).",
            len(engine.scheduler.running),
        )
        metric(
            "mgpu_num_requests_waiting",
            "gauge",
            "Sequences queued for admission (new or pre-empted).",
            len(engine.scheduler.waiting),
        )
        metric(
            "mgpu_kv_cache_usage_ratio",
            "gauge",
            "Fraction of KV-cache blocks in use (0..1).",
            _number(blocks.usage),
        )
        metric(
            "mgpu_kv_cache_free_blocks",
            "gauge",
            "KV-cache blocks held by no sequence.",
            blocks.num_free_blocks,
        )
        metric("mgpu_kv_cache_blocks", "gauge", "KV-cache blocks in all.", blocks.num_blocks)
        metric(
            "mgpu_num_preemptions_total",
            "counter",
            "Sequences pre-empted (blocks freed, recomputed later) for lack of KV cache.",
            stats.num_preemptions,
        )
        metric(
            "mgpu_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled, each counted once.",
            stats.prompt_tokens_total,
        )
        metric(
            "mgpu_recomputed_tokens_total",
            "counter",
            "Tokens prefilled again to resume pre-empted sequences.",
            stats.recomputed_tokens_total,
        )
        metric(
            "mgpu_prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries_total,
        )
        metric(
            "mgpu_prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache (not computed again).",
            stats.prefix_cache_hits_total,
        )
        metric(
            "mgpu_generation_tokens_total",
            "counter",
            "Tokens generated.",
            stats.generation_tokens_total,
        )
        with self._lock:
            name = "mgpu_requests_finished_total"
            out.append(f"# HELP {name} Requests ended, by finish reason.")
            out.append(f"# TYPE {name} counter")
            for reason in sorted(self.finished):
                out.append(
                    f'{name}{{{labels},finish_reason="{_escape(reason)}"}} {self.finished[reason]}'
                )
            for hist_name, hist, help_ in (
                (
                    "mgpu_time_to_first_token_seconds",
                    self.time_to_first_token,
                    "Time from request arrival to its first generated token.",
                ),
                (
                    "mgpu_request_latency_seconds",
                    self.request_latency,
                    "Time from request arrival to its end.",
                ),
            ):
                out.append(f"# HELP {hist_name} {help_}")
                out.append(f"# TYPE {hist_name} histogram")
                out.extend(hist.lines(hist_name, labels))
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
