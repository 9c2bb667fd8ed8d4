"""Entry points: ``mgpu train``, ``python -m mgpu.train`` and ``accelerate launch -m mgpu.train``.

Under ``accelerate launch`` (or ``torchrun``) every process is already started and simply trains.
Started plainly with ``--num_processes N`` (N > 1), the command hands itself to Accelerate's own
launcher, ``accelerate launch --multi_gpu --num_processes N -m mgpu.train ...``, and waits for it:
Accelerate starts the N processes and sets up their process group. ``--multi_gpu`` is the name of
Accelerate's multi-process launcher; on a machine without CUDA the trainer asks Accelerate for CPU
processes, which then join a gloo group. (Accelerate's own ``--cpu`` flag starts one process unless
MPI is installed, so it is not used.)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

import torch

from mgpu.errors import MgpuError
from mgpu.train.args import TrainArgs, add_train_arguments, args_from_namespace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(args: TrainArgs) -> list[str]:
    """The ``accelerate launch`` command line that runs ``args`` on ``args.num_processes``.

    Args:
        args: the run; ``num_processes`` is passed to the launcher, not to the processes.
    """
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(args.num_processes),
        "--num_machines",
        "1",
        "--multi_gpu",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        args.mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    if not torch.cuda.is_available():
        # CPU processes split the cores between them (Accelerate's default is one thread each).
        threads = max(1, (os.cpu_count() or 1) // args.num_processes)
        cmd += ["--num_cpu_threads_per_process", str(threads)]
    return [*cmd, "-m", "mgpu.train", *args.to_argv(skip=("num_processes",))]


def is_launched() -> bool:
    """Whether this process was started by a distributed launcher (it sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def run_train(ns: argparse.Namespace) -> int:
    """Train with parsed ``mgpu train`` flags; returns the exit status."""
    args = args_from_namespace(ns)
    if args.num_processes > 1 and not is_launched():
        if not torch.cuda.is_available() and args.mixed_precision == "fp16":
            raise MgpuError("--mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
        print("mgpu train: launching " + " ".join(launch_command(args)[1:]), flush=True)
        return subprocess.call(launch_command(args))
    from mgpu.train.trainer import train

    train(args)
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mgpu train``."""
    p = sub.add_parser("train", help="LoRA fine-tuning on JSONL data (Accelerate + PEFT)")
    add_train_arguments(p)
    p.set_defaults(handler=run_train)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mgpu.train``: the same flags as ``mgpu train``."""
    parser = argparse.ArgumentParser(prog="mgpu.train", description="LoRA fine-tuning")
    add_train_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return run_train(ns)
    except MgpuError as exc:
        print(f"mgpu train: error: {exc}", file=sys.stderr)
        return 2
