"""The ``mgpu`` command: one entry point, one subcommand per job.

User errors (:class:`~mgpu.errors.MgpuError`) are printed as one line, without a traceback, and exit
with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from mgpu.errors import MgpuError

Handler = Callable[[argparse.Namespace], int]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that starts an engine (vLLM's names)."""
    g = parser.add_argument_group("model and layout")
    g.add_argument("--model", default=None, help="HF model directory or hub id (default: demo)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="ranks per layer")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="pipeline stages")
    g.add_argument(
        "--layer-split",
        default=None,
        help="layers per pipeline stage, e.g. 20,12 (default: even)",
    )
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half"],
        help="weights and activations dtype (auto: the checkpoint's)",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences per batch")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="token budget of one step"
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of each device's memory to use (on CPU: of --device-memory or free RAM)",
    )
    g.add_argument(
        "--device-memory", type=float, default=None, help="CPU only: memory budget in GB"
    )
    g.add_argument(
        "--cpu-reserved-cores",
        type=int,
        default=None,
        help="CPU only: cores kept free for the engine process (default: 1 if cores > ranks)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile decode steps with torch.compile: slower start, faster small-model decode",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """LLMEngine keyword arguments from parsed engine flags."""
    split = None
    if args.layer_split:
        try:
            split = tuple(int(x) for x in args.layer_split.split(","))
        except ValueError:
            raise MgpuError(
                f"--layer-split takes integers like 20,12, got {args.layer_split!r}"
            ) from None
    return {
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "layer_split": split,
        "device": args.device,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "device_memory_gb": args.device_memory,
        "cpu_reserved_cores": args.cpu_reserved_cores,
        "compile_decode": args.compile,
    }


def _generate(args: argparse.Namespace) -> int:
    from mgpu.engine.llm_engine import LLMEngine
    from mgpu.sampling import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop or [],
    )
    engine = LLMEngine(args.model, **engine_kwargs(args))
    try:
        engine.add_request("cli", args.prompt, params)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        sent = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                sys.stdout.write(text[sent:])
                sys.stdout.flush()
                sent = len(text)
        sys.stdout.write("\n")
    finally:
        engine.shutdown()
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    add_engine_arguments(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.set_defaults(handler=_generate)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from mgpu.serve import add_serve_arguments, run_server

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_engine_arguments(p)
    add_serve_arguments(p)
    p.set_defaults(handler=run_server)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    from mgpu.chat import add_chat_arguments, run_chat

    p = sub.add_parser("chat", help="chat in the terminal (with a server, or an engine here)")
    add_engine_arguments(p)
    add_chat_arguments(p)
    p.set_defaults(handler=run_chat)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from mgpu.planner.cli import add_plan_arguments, run_plan

    p = sub.add_parser(
        "plan", help="will it fit, on which GPUs, how fast: before anything is downloaded"
    )
    add_plan_arguments(p)
    p.set_defaults(handler=run_plan)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from mgpu.train.launch import add_train_parser
    from mgpu.train.merge import add_merge_parser

    add_train_parser(sub)
    add_merge_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    """The full ``mgpu`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mgpu", description="Plan, serve and monitor LLMs across several devices."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_chat(sub)
    _add_plan(sub)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mgpu`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except MgpuError as exc:
        if args.debug:
            raise
        print(f"mgpu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mgpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
