"""Per-rank timing from inside the engine: compute, collectives and idle time of every step.

Each worker process holds one :data:`TIMER`. The model runner brackets a step with
:meth:`RankTimer.begin_step` / :meth:`RankTimer.end_step`, and :mod:`mgpu.distributed.communication`
brackets every collective (all-reduce, gather, pipeline send/recv) with
:meth:`RankTimer.collective`. The timer only adds to four cumulative numbers, so it costs a clock
read or two per call; the engine turns two snapshots into rates (:func:`window`).

On CPU the clock is ``time.perf_counter``. On CUDA the step and each collective are bracketed by
CUDA events on the current stream, resolved once they have completed (never a host sync), so a
kernel still running when the host moves on is counted where the device spent it.

Idle time is the host's wait between the end of one step and the start of the next (the rank has
nothing to do); time in collectives includes waiting for slower peers, which is exactly what tells
an uneven split (one rank computes longer, the others wait in all-reduce) from a slow link (every
rank waits).
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_FORMAT = "<dddq"


@dataclass(frozen=True)
class RankTiming:
    """Cumulative seconds of one rank since it started.

    Args:
        step_s: inside steps (compute plus collectives).
        comm_s: inside collectives.
        idle_s: between steps.
        steps: steps run.
    """

    step_s: float = 0.0
    comm_s: float = 0.0
    idle_s: float = 0.0
    steps: int = 0

    @property
    def compute_s(self) -> float:
        """Seconds inside steps and outside collectives."""
        return max(0.0, self.step_s - self.comm_s)

    def encode(self) -> bytes:
        """The 32 bytes a worker publishes in the store."""
        return struct.pack(_FORMAT, self.step_s, self.comm_s, self.idle_s, self.steps)

    @classmethod
    def decode(cls, data: bytes) -> RankTiming:
        """Inverse of :meth:`encode`."""
        return cls(*struct.unpack(_FORMAT, data))


class RankTimer:
    """The accumulator of one rank (see the module docstring).

    Threading: the worker's main thread writes; its heartbeat thread reads :meth:`snapshot`, which
    copies four floats (each read is atomic under the GIL; a snapshot may lag by one collective).
    """

    def __init__(self) -> None:
        self.step_s = 0.0
        self.comm_s = 0.0
        self.idle_s = 0.0
        self.steps = 0
        self._cuda = False
        self._step_start = 0.0
        self._last_end: float | None = None
        self._depth = 0
        self._in_step = False
        # CUDA: (is_step, start event, end event) not yet known to have completed.
        self._pending: list[tuple[bool, Any, Any]] = []
        self._open_step: Any = None

    def use_cuda(self, enabled: bool) -> None:
        """Time with CUDA events (a rank on a GPU) instead of host clocks."""
        self._cuda = enabled

    def _event(self) -> Any:
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin_step(self) -> None:
        """A step starts on this rank."""
        now = time.perf_counter()
        if self._last_end is not None:
            self.idle_s += now - self._last_end
        self._step_start = now
        self._in_step = True
        if self._cuda:
            self._open_step = self._event()

    def end_step(self) -> None:
        """The step that :meth:`begin_step` opened has been issued."""
        now = time.perf_counter()
        self._last_end = now
        self._in_step = False
        self.steps += 1
        if self._cuda:
            self._pending.append((True, self._open_step, self._event()))
            self._resolve()
        else:
            self.step_s += now - self._step_start

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """Bracket one collective; nested brackets count once, and only collectives inside a step
        count (a profiling pass at start-up is not a step)."""
        self._depth += 1
        if self._depth > 1 or not self._in_step:
            try:
                yield
            finally:
                self._depth -= 1
            return
        start = self._event() if self._cuda else time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._cuda:
                self._pending.append((False, start, self._event()))
            else:
                self.comm_s += time.perf_counter() - start

    def _resolve(self) -> None:
        """Add the CUDA intervals whose end event has completed."""
        still = []
        for is_step, start, end in self._pending:
            if not end.query():
                still.append((is_step, start, end))
                continue
            seconds = start.elapsed_time(end) / 1000.0
            if is_step:
                self.step_s += seconds
            else:
                self.comm_s += seconds
        self._pending = still

    def snapshot(self) -> RankTiming:
        """The cumulative numbers now."""
        return RankTiming(self.step_s, self.comm_s, self.idle_s, self.steps)


#: The timer of this process (one rank per worker process).
TIMER = RankTimer()


@dataclass(frozen=True)
class RankWindow:
    """One rank's time over a window between two snapshots.

    Args:
        rank: global rank.
        seconds: wall-clock length of the window.
        compute_s: compute seconds in it.
        comm_s: seconds in collectives in it.
        idle_s: seconds between steps in it.
        steps: steps in it.
    """

    rank: int
    seconds: float
    compute_s: float
    comm_s: float
    idle_s: float
    steps: int

    @property
    def comm_fraction(self) -> float:
        """Share of this rank's step time spent in collectives (0..1)."""
        busy = self.compute_s + self.comm_s
        return self.comm_s / busy if busy > 0 else 0.0


def window(rank: int, old: RankTiming, new: RankTiming, seconds: float) -> RankWindow:
    """The rank's time between snapshots ``old`` and ``new`` taken ``seconds`` apart."""
    return RankWindow(
        rank,
        seconds,
        max(0.0, new.compute_s - old.compute_s),
        max(0.0, new.comm_s - old.comm_s),
        max(0.0, new.idle_s - old.idle_s),
        new.steps - old.steps,
    )


def imbalance_ratio(windows: list[RankWindow]) -> float:
    """Slowest rank's compute over the mean compute of all ranks (1.0 is perfectly even).

    Measured from the engine's own step timings, not from sampled utilisation; 1.0 when no rank
    computed in the window.
    """
    computes = [w.compute_s for w in windows]
    mean = sum(computes) / len(computes) if computes else 0.0
    return max(computes) / mean if mean > 0 else 1.0


def communication_fraction(windows: list[RankWindow]) -> float:
    """Share of all ranks' step time spent in collectives (0..1)."""
    comm = sum(w.comm_s for w in windows)
    busy = comm + sum(w.compute_s for w in windows)
    return comm / busy if busy > 0 else 0.0
