"""How CPU workers share the cores."""

from __future__ import annotations

import pytest

from mgpu.engine import executor


@pytest.fixture
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor.os, "sched_getaffinity", lambda _: set(range(8)))


def test_one_core_is_kept_when_every_rank_keeps_four(eight_cores: None) -> None:
    assert executor.cpu_shares(1) == [[1, 2, 3, 4, 5, 6, 7]]
    assert executor.cpu_shares(2, reserved=1) == [[1, 2, 3], [4, 5, 6]]


def test_no_reserve_when_asked_or_when_cores_are_short(
    eight_cores: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert executor.cpu_shares(2) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 3 each would be kept
    assert executor.cpu_shares(1, reserved=0) == [list(range(8))]
    assert executor.cpu_shares(8) == [[i] for i in range(8)]
    assert executor.cpu_shares(10)[8:] == [[0], [1]]  # more ranks than cores: round-robin


def test_two_cores_one_rank_gets_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor.os, "sched_getaffinity", lambda _: {0, 1})
    assert executor.cpu_shares(1) == [[0, 1]]
