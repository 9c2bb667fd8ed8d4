"""The settings of one training run: declared once, turned into CLI flags and back into argv.

The flag names are those of a Hugging Face training script (``--model_name``, ``--dataset_path``,
``--per_device_train_batch_size``...), so a guide's ``accelerate launch train.py ...`` line works
with ``mgpu train`` in place of ``train.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mgpu.errors import ConfigError


def _help(text: str, **extra: object) -> dict[str, object]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class TrainArgs:
    """One LoRA training run (each field is one ``mgpu train`` flag; its help is the metadata)."""

    model_name: str | None = field(
        default=None, metadata=_help("HF model directory or hub id (default: the bundled demo)")
    )
    dataset_path: str = field(
        default="", metadata=_help("JSONL training data: text, prompt/completion or messages")
    )
    output_dir: str = field(
        default="./lora-out", metadata=_help("where the adapter and checkpoints go")
    )
    num_train_epochs: float = field(default=3.0, metadata=_help("passes over the dataset"))
    per_device_train_batch_size: int = field(default=4, metadata=_help("samples per process"))
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("micro-batches summed before each optimizer step")
    )
    learning_rate: float = field(default=2e-4, metadata=_help("peak AdamW learning rate"))
    lora_r: int = field(default=8, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=16, metadata=_help("LoRA scaling numerator (scale = alpha/r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj",
        metadata=_help("comma-separated module names to wrap, or all-linear"),
    )
    max_seq_length: int = field(default=512, metadata=_help("tokens per sample; longer is cut"))
    mixed_precision: str = field(
        default="no", metadata=_help("autocast dtype", choices=["no", "fp16", "bf16"])
    )
    num_processes: int = field(
        default=1, metadata=_help("data-parallel processes (launched through accelerate)")
    )
    save_steps: int = field(
        default=0, metadata=_help("checkpoint every N optimizer steps (0: only at the end)")
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("checkpoint directory, or 'latest' in --output_dir")
    )
    seed: int = field(default=42, metadata=_help("seed of LoRA init, shuffling and dropout"))
    report_to: str = field(
        default="none", metadata=_help("experiment tracker", choices=["tensorboard", "none"])
    )
    eval_dataset_path: str | None = field(
        default=None, metadata=_help("JSONL evaluated at the end of each epoch")
    )

    def __post_init__(self) -> None:
        positive = (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "lora_r",
            "max_seq_length",
            "num_processes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"--num_train_epochs must be positive, got {self.num_train_epochs}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.save_steps < 0:
            raise ConfigError(f"--save_steps must not be negative, got {self.save_steps}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"--mixed_precision takes no, fp16 or bf16: {self.mixed_precision}")
        if self.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"--report_to takes tensorboard or none: {self.report_to}")
        if not self.dataset_path:
            raise ConfigError("--dataset_path is required (a JSONL file)")

    @property
    def modules(self) -> str | list[str]:
        """``target_modules`` as PEFT takes it."""
        if self.target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def output_path(self) -> Path:
        """The output directory as a path."""
        return Path(self.output_dir)

    def to_argv(self, skip: Sequence[str] = ()) -> list[str]:
        """The flags that give these settings back (those at their default are left out)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in skip or value == f.default:
                continue
            argv += [f"--{f.name}", str(value)]
        return argv


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainArgs` field."""
    for f in dataclasses.fields(TrainArgs):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        kwargs = dict(f.metadata)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, **kwargs)


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """The :class:`TrainArgs` of parsed flags."""
    return TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})
