"""Per-rank timing from inside the engine: compute, collectives and idle time of every step.

Each worker process holds one :data:`TIMER`. The model runner brackets a step with
:meth:`RankTimer.begin_step` / :meth:`RankTimer.end_step`, and :mod:`mgpu.distributed.communication`
brackets every collective (all-reduce, gather, pipeline send/recv) with
:meth:`RankTimer.collective`. The timer only adds to a few cumulative numbers, so it costs a clock
read or two per call; the engine turns two snapshots into rates (:func:`window`).

On CPU the clock is ``time.perf_counter``. On CUDA the step and each collective are bracketed by
CUDA events on the current stream, resolved once they have completed (never a host sync), so a
kernel still running when the host moves on is counted where the device spent it.

Idle time is the host's wait between the end of one step and the start of the next (the rank has
nothing to do). Time in collectives has two parts: moving the data (the link's own cost), and
waiting for a slower peer to arrive, or for the previous pipeline stage to hand its hidden states
on. The waiting is imbalance, not a slow link, and is counted apart (``wait_s``):

- where the collective shows it (the shared-memory all-reduce spins until every rank has published
  its part), the rank measures it itself (:meth:`RankTimer.waited`);
- the rest is found across ranks, per gathered interval of steps (:class:`TimingExchange`): the
  rank that waited least in it saw only the link, since the last rank to arrive at a collective
  waits for nobody; every other rank's extra collective time was waiting. That is exact when one
  rank lags throughout (a slow device, an uneven split) and an upper bound of the link's share
  otherwise.

How the timings reach the engine (no message of their own)::

    engine                          marks step N "gather timings" (every 0.1 s), in its message
    every rank, after step N        gather(its seconds since its last gather) -> output rank
                                    (async, on a gloo group of its own)
    output rank, after step N+k     add every gather that has completed (in order) to the
                                    totals, never waiting, and put every rank's totals in the
                                    reply: a step or two behind
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankTiming:
    """Cumulative seconds of one rank since it started.

    Args:
        step_s: inside steps (compute plus collectives).
        comm_s: inside collectives (moving data plus waiting for peers).
        idle_s: between steps.
        steps: steps run.
        wait_s: the part of ``comm_s`` spent waiting for a slower peer or pipeline stage.
    """

    step_s: float = 0.0
    comm_s: float = 0.0
    idle_s: float = 0.0
    steps: int = 0
    wait_s: float = 0.0

    @property
    def compute_s(self) -> float:
        """Seconds inside steps and outside collectives."""
        return max(0.0, self.step_s - self.comm_s)

    @property
    def transfer_s(self) -> float:
        """Seconds inside collectives not spent waiting for a peer: the link's own cost."""
        return max(0.0, self.comm_s - self.wait_s)


class RankTimer:
    """The accumulator of one rank (see the module docstring).

    Threading: only the worker's main thread uses it.
    """

    def __init__(self) -> None:
        self.step_s = 0.0
        self.comm_s = 0.0
        self.idle_s = 0.0
        self.wait_s = 0.0
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

    def waited(self, seconds: float) -> None:
        """Inside a collective, the rank spent ``seconds`` waiting for its peers to arrive."""
        if self._in_step:
            self.wait_s += seconds

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
        """The cumulative numbers now (``wait_s``: only the waiting the rank saw itself)."""
        return RankTiming(self.step_s, self.comm_s, self.idle_s, self.steps, self.wait_s)


#: The timer of this process (one rank per worker process).
TIMER = RankTimer()

#: Starts gathering one rank's (5,) float64 step seconds onto the output rank: returns the
#: pending work and, on the output rank, the (world_size,) list of tensors it fills.
GatherFn = Callable[[Any], tuple[Any, list[Any] | None]]


def add_step(totals: list[RankTiming], steps: list[RankTiming]) -> list[RankTiming]:
    """Every rank's totals after one more gathered interval of steps, whose seconds ``steps``
    holds (one entry per rank).

    The rank that spent least time in the interval's collectives, less what it saw itself as
    waiting, measures what moving the data cost (the module docstring says why); each rank's
    collective time beyond that was waiting for a peer.

    Args:
        totals: each rank's cumulative timings so far, by rank.
        steps: each rank's seconds in the interval (``wait_s``: the waiting it measured itself).
    """
    link = min(s.transfer_s for s in steps)
    return [
        RankTiming(
            t.step_s + s.step_s,
            t.comm_s + s.comm_s,
            t.idle_s + s.idle_s,
            t.steps + s.steps,
            t.wait_s + max(0.0, s.comm_s - link),
        )
        for t, s in zip(totals, steps, strict=True)
    ]


class TimingExchange:
    """Brings every rank's step timings to the output rank with the steps themselves.

    After the steps the engine marks (one every :data:`~mgpu.engine.executor.TIMING_EVERY_S`),
    every rank starts one asynchronous gather of its seconds since its last contribution (five
    numbers) to the output rank. After each step the output rank adds every gather that has
    completed, oldest first, to the totals (:func:`add_step`) and returns them for its reply; it
    never waits for one (gathers complete in the order they were started, each once every rank
    has posted it, which each does before it takes part in the next step). The numbers therefore
    lag by a step or two and cost no round trip of their own; starting a gather costs about
    0.2 ms of host time on a loaded CPU, which is why not every step carries one.

    Args:
        timer: this rank's timer.
        world_size: number of ranks.
        is_output_rank: whether this rank replies to steps.
        gather: starts the gather (``mgpu.distributed.communication.gather_step_timings``);
            unused with one rank.

    Threading: the worker's main thread only.
    """

    def __init__(self, timer: RankTimer, world_size: int, is_output_rank: bool, gather: GatherFn):
        self.timer, self.world_size = timer, world_size
        self.is_output_rank, self.gather = is_output_rank, gather
        self.totals = [RankTiming() for _ in range(world_size)]
        self._last = RankTiming()
        # Gathers not yet known to be complete, with the tensors they read and (output rank) fill.
        self._pending: list[tuple[Any, Any, list[Any] | None]] = []

    def after_step(self, gather: bool = True) -> list[RankTiming] | None:
        """After a step: with ``gather``, contribute this rank's seconds since its last
        contribution; on the output rank, return every rank's totals when they have changed.

        Args:
            gather: contribute now. Every rank must be given the same value for the same step
                (the engine decides, in the step message), so the gathers pair up.
        """
        import torch

        if not gather:
            return self._collect() if self.is_output_rank and self.world_size > 1 else None
        now = self.timer.snapshot()
        last, self._last = self._last, now
        step = RankTiming(
            now.step_s - last.step_s,
            now.comm_s - last.comm_s,
            now.idle_s - last.idle_s,
            now.steps - last.steps,
            now.wait_s - last.wait_s,
        )
        if self.world_size == 1:
            self.totals = add_step(self.totals, [step])
            return self.totals
        x = torch.tensor(  # (5,)
            [step.step_s, step.comm_s, step.idle_s, step.steps, step.wait_s], dtype=torch.float64
        )
        work, parts = self.gather(x)
        self._pending.append((work, x, parts))
        if not self.is_output_rank:
            self._pending = [p for p in self._pending if not p[0].is_completed()]
            return None
        return self._collect()

    def _collect(self) -> list[RankTiming] | None:
        """Add the gathers that have completed, oldest first; the totals if any was added."""
        changed = False
        while self._pending and self._pending[0][0].is_completed():
            work, _, parts = self._pending.pop(0)
            work.wait()  # complete: raises only if the gather failed
            assert parts is not None
            values = [p.tolist() for p in parts]  # world_size x (5,)
            steps = [RankTiming(v[0], v[1], v[2], int(v[3]), v[4]) for v in values]
            self.totals = add_step(self.totals, steps)
            changed = True
        return self.totals if changed else None

    def finish(self) -> None:
        """Wait for this rank's gathers still in flight (at a clean shutdown, every rank is up)."""
        for work, _, _ in self._pending:
            work.wait()
        self._pending = []


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
        wait_s: the part of ``comm_s`` spent waiting for a peer.
    """

    rank: int
    seconds: float
    compute_s: float
    comm_s: float
    idle_s: float
    steps: int
    wait_s: float = 0.0

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
        max(0.0, new.wait_s - old.wait_s),
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
    """Share of all ranks' step time spent in collectives, waiting included (0..1)."""
    comm = sum(w.comm_s for w in windows)
    busy = comm + sum(w.compute_s for w in windows)
    return comm / busy if busy > 0 else 0.0


def transfer_fraction(windows: list[RankWindow]) -> float:
    """Share of all ranks' step time spent moving data in collectives, waiting for peers left
    out (0..1): what a slow interconnect raises, and an uneven split does not."""
    transfer = sum(max(0.0, w.comm_s - w.wait_s) for w in windows)
    busy = sum(w.comm_s + w.compute_s for w in windows)
    return transfer / busy if busy > 0 else 0.0
