"""Training runs: one process in this one, two through Accelerate's launcher, and early failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgpu.cli import main as mgpu_main
from mgpu.errors import MgpuError
from mgpu.train.args import TrainArgs
from mgpu.train.checkpoint import OutputDirError
from mgpu.train.data import DatasetError
from mgpu.train.trainer import SUMMARY_FILE, train
from tests.train.conftest import records, write_jsonl


def quick(dataset: Path, out: Path, **overrides: object) -> TrainArgs:
    """A few steps of the demo model at a learning rate that moves it."""
    settings: dict[str, object] = {
        "dataset_path": str(dataset),
        "output_dir": str(out),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "lora_dropout": 0.0,
        "max_seq_length": 48,
    }
    settings.update(overrides)
    return TrainArgs(**settings)  # type: ignore[arg-type]


def test_one_process_lowers_loss_and_writes_a_peft_adapter(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", records(8))
    args = quick(data, tmp_path / "out", eval_dataset_path=str(data), report_to="tensorboard")
    result = train(args)
    assert result.global_step == 4
    assert result.losses[-1] < result.losses[0]
    assert result.eval_loss is not None
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / SUMMARY_FILE).read_text())["effective_batch"] == 4
    assert logged_scalars(out / "runs") >= {
        "train/loss",
        "train/learning_rate",
        "tokens_per_s/process_0",
        "eval/loss",
    }


def logged_scalars(logdir: Path) -> set[str]:
    """The scalar tags of every TensorBoard event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_two_processes_share_batches_and_stay_in_step(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", records(8))
    out = tmp_path / "out"
    flags = [
        "--dataset_path", str(data), "--output_dir", str(out), "--num_train_epochs", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--lora_dropout", "0",
        "--max_seq_length", "48", "--num_processes", "2",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "mgpu.train", *flags], capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 2 per device x 2 processes x 1 accumulation = 4" in proc.stdout
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["num_processes"] == 2
    assert summary["global_step"] == 4
    losses = summary["losses"]
    assert losses[-1] < losses[0]
    first, second = summary["first_step_samples"]
    assert len(first) == len(second) == 2
    assert not set(first) & set(second)
    a, b = summary["param_checksums_after_first_step"]
    assert a == b


def test_missing_dataset_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset not found"):
        train(quick(tmp_path / "nope.jsonl", tmp_path / "out"))
    assert not (tmp_path / "out" / SUMMARY_FILE).exists()


def test_unwritable_output_dir_is_reported_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", records(4))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    status = mgpu_main(["train", "--dataset_path", str(data), "--output_dir", str(blocker / "out")])
    assert status == 2
    assert "is not writable" in capsys.readouterr().err


def test_full_output_dir_is_reported_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from mgpu.train import checkpoint

    data = write_jsonl(tmp_path / "train.jsonl", records(4))
    real = shutil.disk_usage

    def nearly_full(path: object) -> object:
        return real(path)._replace(free=1024)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", nearly_full)
    with pytest.raises(OutputDirError, match="MiB free"):
        train(quick(data, tmp_path / "out"))


def test_bad_flags_are_refused() -> None:
    with pytest.raises(MgpuError, match="--lora_r"):
        TrainArgs(dataset_path="d.jsonl", lora_r=0)
    with pytest.raises(MgpuError, match="--dataset_path is required"):
        TrainArgs()


def test_the_planners_train_command_is_accepted() -> None:
    import shlex

    from mgpu.cli import build_parser
    from mgpu.planner.train import plan_lora
    from mgpu.train.args import args_from_namespace

    command = plan_lora("Llama-3.1-8B", "2x4090", dataset_tokens=1_000_000).command
    argv = shlex.split(command)
    assert argv[:2] == ["mgpu", "train"]
    args = args_from_namespace(build_parser().parse_args(argv[1:]))
    assert args.dataset_path == "data.jsonl"
    assert args.model_name
    assert args.num_processes == 2  # one process per GPU of the plan


def test_bf16_autocast_with_gradient_accumulation(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", records(8))
    args = quick(
        data,
        tmp_path / "out",
        num_train_epochs=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        mixed_precision="bf16",
    )
    result = train(args)
    assert result.global_step == 2
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["effective_batch"] == 4
    assert len(summary["first_step_samples"][0]) == 4  # both micro-batches of the first step
    assert all(loss == loss for loss in result.losses)  # no NaN
