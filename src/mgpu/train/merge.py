"""``mgpu merge``: fold a LoRA adapter into its base model's weights.

The result is an ordinary Hugging Face model directory (``config.json``, ``*.safetensors``, the
tokenizer) that ``mgpu serve`` and :class:`mgpu.LLM` load like any other, with no LoRA cost per
token. PEFT does the arithmetic (``W + scale * B @ A`` for each wrapped linear).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mgpu.errors import MgpuError


def merge_adapter(model: str | None, adapter: str | Path, output: str | Path) -> Path:
    """Write the base model with the adapter merged in.

    Args:
        model: base model directory or hub id (default: the bundled demo model).
        adapter: a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).
        output: directory to write; created if missing.

    Raises:
        MgpuError: the adapter directory is not a PEFT adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mgpu.models.loader import demo_model_path

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise MgpuError(f"--adapter {adapter} has no adapter_config.json (not a PEFT adapter)")
    base = model if model else str(demo_model_path())
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    merged = merged.merge_and_unload()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(output)
    return output


def run_merge(ns: argparse.Namespace) -> int:
    """``mgpu merge`` with parsed flags; returns the exit status."""
    out = merge_adapter(ns.model, ns.adapter, ns.output)
    print(f"mgpu merge: merged {ns.adapter} into {ns.model or 'the demo model'}: {out}")
    return 0


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mgpu merge``."""
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model's weights")
    p.add_argument("--model", default=None, help="base model directory or hub id (default: demo)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.set_defaults(handler=run_merge)
