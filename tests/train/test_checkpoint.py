"""Checkpoints: atomic publication, ``latest``, and a SIGKILLed run resumed to the same loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgpu.errors import MgpuError
from mgpu.train.checkpoint import (
    STATE_FILE,
    checkpoint_dir,
    latest_checkpoint,
    publish,
    resolve_resume,
    temp_dir,
)
from mgpu.train.trainer import SUMMARY_FILE, train
from tests.train.conftest import records, write_jsonl
from tests.train.test_train import quick


def test_latest_ignores_unfinished_and_temp_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10):
        checkpoint_dir(tmp_path, step).mkdir()
        (checkpoint_dir(tmp_path, step) / STATE_FILE).write_text("{}")
    checkpoint_dir(tmp_path, 12).mkdir()  # no trainer state: not complete
    temp_dir(tmp_path, 14).mkdir()
    (temp_dir(tmp_path, 14) / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    assert resolve_resume(tmp_path, "latest") == checkpoint_dir(tmp_path, 10)
    with pytest.raises(MgpuError, match="not a complete mgpu checkpoint"):
        resolve_resume(tmp_path, str(checkpoint_dir(tmp_path, 12)))
    with pytest.raises(MgpuError, match="no checkpoint"):
        resolve_resume(tmp_path / "empty", "latest")


def test_publish_replaces_atomically(tmp_path: Path) -> None:
    tmp = temp_dir(tmp_path, 3)
    tmp.mkdir()
    (tmp / STATE_FILE).write_text('{"global_step": 3}')
    publish(tmp, checkpoint_dir(tmp_path, 3))
    assert not tmp.exists()
    assert json.loads((checkpoint_dir(tmp_path, 3) / STATE_FILE).read_text())["global_step"] == 3


def test_killed_run_resumes_to_the_uninterrupted_loss(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", records(16))
    settings = {"per_device_train_batch_size": 2, "lora_dropout": 0.1, "save_steps": 2}
    reference = train(quick(data, tmp_path / "reference", **settings))
    assert reference.global_step == 16

    out = tmp_path / "killed"
    argv = quick(data, out, **settings).to_argv()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgpu.train", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / SUMMARY_FILE).exists(), "killed after the run had finished"
    killed_at = json.loads((latest_checkpoint(out) / STATE_FILE).read_text())["global_step"]
    assert killed_at < 16

    resumed = train(quick(data, out, resume_from_checkpoint="latest", **settings))
    assert resumed.global_step == 16
    assert resumed.losses == pytest.approx(reference.losses, abs=1e-3)


def test_resume_with_another_process_count_is_refused(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", records(4))
    out = tmp_path / "out"
    checkpoint_dir(out, 2).mkdir(parents=True)
    state = {"global_step": 2, "epoch": 0, "micro_step": 2, "num_processes": 2, "losses": []}
    (checkpoint_dir(out, 2) / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(MgpuError, match="resume it with --num_processes 2"):
        train(quick(data, out, resume_from_checkpoint="latest"))
