"""A worker that dies is noticed within seconds, and no process outlives the engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from mgpu import LLM, SamplingParams
from mgpu.errors import WorkerError


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_worker_raises_quickly(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, device="cpu", dtype="float32", num_blocks=64)
    pids = [p.pid for p in llm.engine.executor.procs]
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Timer(1.0, kill)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    killer.start()
    with pytest.raises(WorkerError, match=r"worker rank 1 .* died"):
        for _ in range(1000):  # long enough that the kill lands mid-generation
            llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4, params, use_tqdm=False)
    # Within a second of the kill (with a margin for this loaded test machine).
    assert time.monotonic() - killed_at[0] < 1.5
    assert not llm.engine.is_healthy
    # The survivors are stopped in the background, after the error has been raised.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _running(p)]
    llm.shutdown()


def test_no_orphans_when_parent_is_killed(tiny_llama: Path, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, time
        from mgpu import LLM
        if __name__ == "__main__":
            llm = LLM({str(tiny_llama)!r}, tensor_parallel_size=2, device="cpu", num_blocks=16)
            print(" ".join(str(p.pid) for p in llm.engine.executor.procs), flush=True)
            time.sleep(600)
    """)
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.2)
        alive = [
            p
            for p in pids
            if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        assert not alive, f"orphan workers {alive}"
    finally:
        parent.kill()


def test_shutdown_leaves_no_process(tiny_llama: Path) -> None:
    with LLM(str(tiny_llama), tensor_parallel_size=2, device="cpu", num_blocks=16) as llm:
        procs = list(llm.engine.executor.procs)
    assert all(p.poll() is not None for p in procs)
