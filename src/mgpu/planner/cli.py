"""``mgpu plan``: the command-line face of the planner.

``add_plan_arguments`` adds the flags to a subparser and ``run_plan`` answers; the module also runs
on its own (``python -m mgpu.planner.cli --model ... --gpus ...``).

Exit codes: 0 when the plan fits (or the recommendation was produced), 3 when the model does not
fit the GPUs. A request that cannot be planned raises :class:`~mgpu.errors.ConfigError`, whose
message says why; ``mgpu``'s entry point prints it and exits with 2, as :func:`main` here does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

from mgpu.errors import ConfigError, MgpuError
from mgpu.planner.engines import ENGINES
from mgpu.planner.hardware import INTERCONNECTS
from mgpu.planner.plan import DEFAULT_CONTEXT, PARALLELISMS, plan
from mgpu.planner.quant import KV_CACHE_BYTES

EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``mgpu plan`` flag to ``parser``.

    Args:
        parser: the ``plan`` subparser (or a fresh parser).
    """
    parser.add_argument(
        "--model",
        required=True,
        help="Catalogue name as people write it (Llama-3.3-70B, meta-llama/Llama-3.3-70B-Instruct, "
        "llama3.3:70b-instruct-q4_K_M), a Hugging Face model directory, or a .gguf file.",
    )
    parser.add_argument(
        "--gpus",
        help="GPUs as people write them: '2x RTX 4090 24GB', '2x4090', '4090,3090', '8xH100-SXM'. "
        "Default: the GPUs NVML detects.",
    )
    parser.add_argument(
        "--quantization",
        help="Weight precision: f32, bf16, f16, fp8, int8, int4, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, "
        "gptq-int4, awq-int4, exl2-<bits>. Default: what the model name or files imply, else bf16.",
    )
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        help="Whose speed to predict (default: mgpu).",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help=f"Tokens per sequence the KV cache holds (default {DEFAULT_CONTEXT}, or the model's "
        "context if shorter; with --train, the sequence length, default 2048).",
    )
    parser.add_argument("--concurrency", type=int, help="Sequences served at once (default 1).")
    parser.add_argument(
        "--parallelism",
        choices=PARALLELISMS,
        help="auto picks the fastest layout that fits; or force single, tp, pp, layer-split, "
        "ep (expert parallel, mixtures of experts only).",
    )
    parser.add_argument("--tensor-parallel-size", type=int, help="Force this tensor-parallel size.")
    parser.add_argument(
        "--pipeline-parallel-size", type=int, help="Force this many pipeline stages."
    )
    parser.add_argument(
        "--interconnect",
        choices=INTERCONNECTS,
        help="Link between the GPUs (default: their own: NVLink for SXM boards, else their PCIe).",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=sorted(KV_CACHE_BYTES),
        help="KV-cache element type (auto = 16-bit).",
    )
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="Draw the per-GPU memory breakdown (plans and --train)."
    )
    parser.add_argument(
        "--recommend",
        action="store_true",
        help="Rank hardware to buy or rent for --model instead of planning for --gpus.",
    )
    parser.add_argument(
        "--budget", type=float, help="With --recommend: most the GPUs may cost (USD)."
    )
    parser.add_argument(
        "--train", choices=("lora",), help="Plan LoRA fine-tuning instead of inference."
    )
    parser.add_argument(
        "--dataset-tokens", type=int, help="With --train: tokens in one epoch of the dataset."
    )
    parser.add_argument("--lora-rank", type=int, help="With --train: LoRA rank (default 16).")
    parser.add_argument(
        "--micro-batch-size", type=int, help="With --train: sequences per GPU per step (default 1)."
    )


#: The flags each mode reads; a flag given in a mode that does not read it is refused.
_MODE_FLAGS = {
    "plan": {
        "gpus",
        "quantization",
        "engine",
        "context",
        "concurrency",
        "parallelism",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "interconnect",
        "kv_cache_dtype",
        "plot",
    },
    "recommend": {"quantization", "engine", "context", "concurrency", "kv_cache_dtype", "budget"},
    "train": {
        "gpus",
        "quantization",
        "context",
        "interconnect",
        "dataset_tokens",
        "lora_rank",
        "micro_batch_size",
        "plot",
    },
}
_MODE_NAMES = {"plan": "a plan for --gpus", "recommend": "--recommend", "train": "--train lora"}


def check_flags(args: argparse.Namespace) -> str:
    """The mode of this ``mgpu plan`` call; refuse any flag that mode would not honour.

    Args:
        args: parsed flags from :func:`add_plan_arguments`.

    Raises:
        ConfigError: for a flag given in a mode that ignores it, or two modes at once.
    """
    if args.recommend and args.train:
        raise ConfigError("--recommend and --train are separate questions; give one of them")
    mode = "recommend" if args.recommend else "train" if args.train else "plan"
    every = sorted(set().union(*_MODE_FLAGS.values()))
    ignored = [n for n in every if getattr(args, n) is not None and n not in _MODE_FLAGS[mode]]
    if ignored:
        told = []
        for name in ignored:
            modes = [_MODE_NAMES[m] for m, names in _MODE_FLAGS.items() if name in names]
            told.append(f"--{name.replace('_', '-')} (read only with {' or '.join(modes)})")
        raise ConfigError(f"{_MODE_NAMES[mode]} does not use {', '.join(told)}")
    return mode


def run_plan(args: argparse.Namespace, console: Console | None = None) -> int:
    """Answer ``mgpu plan``: print the plan (table or JSON) and return the exit code.

    Args:
        args: parsed flags from :func:`add_plan_arguments`.
        console: where to print (standard output by default).

    Raises:
        ConfigError: for a request that cannot be planned (unknown names list the closest ones).
    """
    console = console or Console()
    mode = check_flags(args)
    if mode == "recommend":
        return _recommend(args, console)
    if mode == "train":
        return _train(args, console)
    result = plan(
        args.model,
        args.gpus,
        quantization=args.quantization,
        engine=args.engine or "mgpu",
        context=args.context,
        concurrency=1 if args.concurrency is None else args.concurrency,
        parallelism=args.parallelism or "auto",
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        interconnect=args.interconnect,
        kv_cache_dtype=args.kv_cache_dtype or "auto",
    )
    from mgpu.planner.render import render_plan

    _emit(result, args.json, console, render_plan)
    _plot(result, args.plot)
    return 0 if result.fits else EXIT_DOES_NOT_FIT


def _plot(result: Any, path: str | None) -> None:
    """Draw ``--plot`` for a plan or a training plan, and say where it went."""
    if path:
        from mgpu.planner.plot import plot_memory

        written = plot_memory(result, path)
        print(f"memory breakdown written to {written}", file=sys.stderr)


def _emit(
    result: Any, as_json: bool, console: Console, render: Callable[[Any, Console], None]
) -> None:
    """Print a planner result as the JSON contract (``to_dict``) or as rich tables."""
    if as_json:
        print(json.dumps(result.to_dict(), indent=2), file=console.file)
    else:
        render(result, console)


def _recommend(args: argparse.Namespace, console: Console) -> int:
    from mgpu.planner.recommend import recommend

    rec = recommend(
        args.model,
        quantization=args.quantization,
        engine=args.engine or "mgpu",
        context=args.context,
        concurrency=1 if args.concurrency is None else args.concurrency,
        kv_cache_dtype=args.kv_cache_dtype or "auto",
        budget_usd=args.budget,
    )
    from mgpu.planner.render import render_recommendation

    _emit(rec, args.json, console, render_recommendation)
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    from mgpu.planner.train import plan_lora

    if not args.dataset_tokens:
        raise ConfigError("--train lora needs --dataset-tokens (tokens in one epoch)")
    if not args.gpus:
        raise ConfigError("--train lora needs --gpus")
    result = plan_lora(
        args.model,
        args.gpus,
        dataset_tokens=args.dataset_tokens,
        quantization=args.quantization,
        seq_len=args.context or 2048,
        micro_batch_size=args.micro_batch_size or 1,
        lora_rank=args.lora_rank or 16,
        interconnect=args.interconnect,
    )
    from mgpu.planner.render import render_train

    _emit(result, args.json, console, render_train)
    _plot(result, args.plot)
    return 0 if result.fits else EXIT_DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
    """Run ``mgpu plan`` on its own.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(
        prog="mgpu plan",
        description="Does my model fit these GPUs, how should it be split, how fast will it be?",
    )
    add_plan_arguments(parser)
    try:
        return run_plan(parser.parse_args(argv))
    except MgpuError as exc:
        print(f"mgpu plan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
