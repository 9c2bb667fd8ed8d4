"""What every entry point shares (``mgpu``, ``python -m mgpu.serve``): parsed flags to
:class:`~mgpu.config.EngineArgs`, and running a command with one-line user errors.

The entry points import this module and never each other, so ``cli.py``, ``serve.py`` and
``chat.py`` form no import circle: ``cli`` imports the subcommands, they import only this.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from mgpu.config import EngineArgs
from mgpu.errors import MgpuError

Handler = Callable[[argparse.Namespace], int]

#: Environment variable read when ``--api-key`` is not given (server and chat client).
API_KEY_ENV = "MGPU_API_KEY"


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """The engine settings of parsed flags; a positional model (``mgpu serve MODEL``) counts too.

    Args:
        args: the parsed command line.
    """
    positional = getattr(args, "model_tag", None)
    if positional is not None:
        if args.model is not None and args.model != positional:
            raise MgpuError(f"two models given: {positional!r} and --model {args.model!r}")
        args.model = positional
    return EngineArgs.from_cli_args(args)


def run_command(args: argparse.Namespace, handler: Handler) -> int:
    """Run ``handler(args)``; a user error is one line on stderr and exit status 2
    (``--debug`` shows the traceback).

    Args:
        args: the parsed command line.
        handler: the subcommand.
    """
    level = getattr(args, "log_level", "warning")
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "model_tag"):
            engine_args(args)  # fold `mgpu serve MODEL` into --model, refusing two different ones
        return handler(args)
    except MgpuError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"mgpu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mgpu: interrupted", file=sys.stderr)
        return 130
