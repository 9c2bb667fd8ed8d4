"""The ``mgpu`` command: one entry point, one subcommand per job.

User errors (:class:`~mgpu.errors.MgpuError`) are printed as one line, without a traceback, and exit
with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mgpu.config import EngineArgs
from mgpu.entry import Handler, engine_args, run_command

__all__ = ["add_engine_arguments", "build_parser", "engine_args", "main"]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that starts an engine: one per :class:`EngineArgs` field."""
    EngineArgs.add_cli_args(parser)


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
    engine = LLMEngine.from_engine_args(engine_args(args))
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
    p.add_argument("--stop", action="append", help="stop string (repeatable); --seed seeds it")
    p.set_defaults(handler=_generate)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from mgpu.serve import add_serve_command, run_server

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_serve_command(p)
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


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    from mgpu.monitor.view import add_monitor_arguments, run_monitor

    p = sub.add_parser("monitor", help="live per-device and per-rank view of a server")
    add_monitor_arguments(p)
    p.set_defaults(handler=run_monitor)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from mgpu.bench.cli import add_bench_arguments

    p = sub.add_parser("bench", help="load-test any OpenAI-compatible server (or sweep layouts)")
    add_bench_arguments(p)


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
    _add_monitor(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mgpu`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return run_command(args, handler)


if __name__ == "__main__":
    sys.exit(main())
