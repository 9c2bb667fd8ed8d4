"""Checkpoints written atomically, found again after a crash, and an output directory checked early.

A checkpoint is ``OUTPUT/checkpoint-STEP/``: Accelerate's ``save_state`` files (optimizer,
scheduler, every process's RNG states, the sampler) plus ``adapter/`` (the PEFT adapter, not the
frozen base weights) and ``trainer_state.json`` (the data position: step, epoch, micro-batch).
Every process writes into ``OUTPUT/.checkpoint-STEP.tmp/``; once all have finished, the main
process renames it into place. A rename is atomic on one file system, so a crash mid-write leaves a
``.tmp`` directory that nothing reads, and the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mgpu.errors import MgpuError

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class OutputDirError(MgpuError):
    """The output directory cannot take the run's checkpoints."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of optimizer step ``step`` lives."""
    return output_dir / f"checkpoint-{step}"


def temp_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is renamed into place."""
    return output_dir / f".checkpoint-{step}.tmp"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or ``None``."""
    if not output_dir.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names (``latest``: the newest in output_dir).

    Raises:
        MgpuError: the named checkpoint does not exist, or ``latest`` finds none.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise MgpuError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise MgpuError(f"--resume_from_checkpoint: {path} is not a complete mgpu checkpoint")
    return path


def publish(tmp: Path, final: Path) -> None:
    """Move a fully written checkpoint into place (main process only, after every rank wrote).

    Args:
        tmp: the directory the checkpoint was written into.
        final: its name once complete; an older directory of that name is replaced.
    """
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write the trainer state (data position and loss history) of a checkpoint."""
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_state(directory: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint."""
    return json.loads((directory / STATE_FILE).read_text())


def check_output_dir(output_dir: Path, needed_bytes: int) -> None:
    """Fail now, not after an hour of training, if checkpoints cannot be written.

    Args:
        output_dir: created if missing.
        needed_bytes: what the run will write (adapter, optimizer state, a few checkpoints).

    Raises:
        OutputDirError: the directory cannot be created or written, or lacks the space.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".mgpu-write-test-{os.getpid()}"  # one per process: they race
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(
            f"--output_dir {output_dir} is not writable: {exc.strerror or exc}"
        ) from None
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OutputDirError(
            f"--output_dir {output_dir} has {free / 2**20:.1f} MiB free; the run needs about "
            f"{needed_bytes / 2**20:.1f} MiB for its checkpoints"
        )
