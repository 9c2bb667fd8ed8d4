"""Per-rank timing: the accumulator's arithmetic, and a real TP=2 engine that stays even."""

from __future__ import annotations

import time

import pytest

from mgpu.engine.llm import LLM
from mgpu.monitor.timing import (
    RankTimer,
    RankTiming,
    RankWindow,
    communication_fraction,
    imbalance_ratio,
    window,
)
from mgpu.sampling import SamplingParams


def test_timer_splits_a_step_into_compute_and_collectives() -> None:
    timer = RankTimer()
    timer.begin_step()
    time.sleep(0.02)  # compute
    with timer.collective(), timer.collective():  # nested: counted once
        time.sleep(0.03)
    timer.end_step()
    time.sleep(0.01)  # idle
    timer.begin_step()
    timer.end_step()
    t = timer.snapshot()
    assert t.steps == 2
    assert 0.03 <= t.comm_s < 0.03 + 0.05
    assert 0.02 <= t.compute_s < 0.02 + 0.05
    assert 0.01 <= t.idle_s < 0.01 + 0.05
    assert t.step_s == pytest.approx(t.compute_s + t.comm_s)


def test_collectives_outside_a_step_are_not_counted() -> None:
    timer = RankTimer()
    with timer.collective():  # a profiling forward pass at start-up
        time.sleep(0.01)
    assert timer.snapshot() == RankTiming()


def test_timing_round_trips_through_the_store_encoding() -> None:
    t = RankTiming(1.5, 0.25, 3.0, 42)
    assert len(t.encode()) == 32
    assert RankTiming.decode(t.encode()) == t


def test_window_ratio_and_fraction() -> None:
    old = RankTiming(1.0, 0.5, 0.0, 10)
    new = RankTiming(3.0, 1.0, 0.5, 30)
    w = window(0, old, new, 4.0)
    assert (w.compute_s, w.comm_s, w.idle_s, w.steps) == (1.5, 0.5, 0.5, 20)
    assert w.comm_fraction == pytest.approx(0.25)
    even = [RankWindow(r, 1.0, 0.4, 0.1, 0.0, 5) for r in range(2)]
    assert imbalance_ratio(even) == pytest.approx(1.0)
    uneven = [RankWindow(0, 1.0, 0.2, 0.6, 0, 5), RankWindow(1, 1.0, 0.6, 0.2, 0, 5)]
    assert imbalance_ratio(uneven) == pytest.approx(0.6 / 0.4)
    assert communication_fraction(uneven) == pytest.approx(0.5)
    assert imbalance_ratio([]) == 1.0
    assert communication_fraction([]) == 0.0


def test_tp2_engine_ranks_stay_even() -> None:
    """Without MGPU_TEST_SLOW_RANK the two shards of a TP=2 engine compute alike."""
    llm = LLM(tensor_parallel_size=2, device="cpu")
    try:
        executor = llm.engine.executor
        time.sleep(0.6)  # two heartbeats: the published timings are current
        before, start = executor.rank_timings(), time.monotonic()
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        llm.generate(["hello there", "tensor parallel"], params, use_tqdm=False)
        time.sleep(0.6)
        after, seconds = executor.rank_timings(), time.monotonic() - start
    finally:
        llm.shutdown()
    windows = [window(r, before[r], after[r], seconds) for r in (0, 1)]
    assert all(w.steps >= 24 for w in windows)
    assert all(w.compute_s > 0 and w.comm_s > 0 for w in windows)
    # Each rank's step time is at most the window it ran in.
    assert all(w.compute_s + w.comm_s <= seconds for w in windows)
    assert imbalance_ratio(windows) < 1.3
