"""``mgpu serve``: the OpenAI-compatible HTTP server (also ``python -m mgpu.serve``).

Flags take vLLM's names, so a ``vllm serve`` command line works with the program name changed.
Start-up loads the engine, prints what it did (layout per rank, KV-cache size, how many sequences
fit at full context, the URL) and serves until SIGINT or SIGTERM. The signal starts a drain: new
requests get 503, those in flight get ``--shutdown-timeout`` seconds to finish (then a final error
event), and the workers stop (see :mod:`mgpu.server.lifecycle`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from mgpu.config import EngineArgs
from mgpu.entry import API_KEY_ENV, run_command
from mgpu.errors import ConfigError
from mgpu.monitor.watch import MonitorConfig

__all__ = ["API_KEY_ENV", "add_serve_arguments", "add_serve_command", "main", "run_server"]


def add_serve_command(parser: argparse.ArgumentParser) -> None:
    """Everything ``mgpu serve`` takes: the positional model, the engine flags (one per
    :class:`~mgpu.config.EngineArgs` field) and the server's own flags.

    Args:
        parser: the ``serve`` subcommand's parser, or ``python -m mgpu.serve``'s.
    """
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="as --model")
    EngineArgs.add_cli_args(parser)
    add_serve_arguments(parser)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (the engine flags come from :class:`mgpu.config.EngineArgs`).

    Args:
        parser: the ``serve`` subcommand's parser.
    """
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    g.add_argument(
        "--served-model-name", default=None, help="name clients use (default: the model's)"
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 20,
        help="largest request body accepted (413 above it)",
    )
    g.add_argument(
        "--max-n",
        type=int,
        default=16,
        help="most completions per request, for n and best_of (400 above it)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds SIGTERM waits for requests in flight before failing them",
    )
    g.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open",
    )
    g.add_argument(
        "--timeout-request-read",
        type=float,
        default=10.0,
        help="seconds a client has to send a whole request (headers and body) once connected",
    )
    g.add_argument(
        "--uvicorn-log-level",
        default=None,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: --log-level)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the model and layout, print the per-rank table, exit (no weights read)",
    )
    g.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        help="debug, info, warning, error (info also logs each HTTP request)",
    )
    MonitorConfig.add_arguments(parser)


def run_server(args: argparse.Namespace) -> int:
    """Start the engine, print the start-up report, serve until interrupted.

    Args:
        args: parsed ``serve`` flags (engine and server).
    """
    from mgpu.engine.headless import dry_run, run_headless, served_names
    from mgpu.engine.llm_engine import LLMEngine
    from mgpu.lora.adapter import check_served_names
    from mgpu.server.app import ServerConfig, build_app
    from mgpu.server.async_engine import AsyncEngine
    from mgpu.server.lifecycle import serve

    engine_args = EngineArgs.from_cli_args(args)
    if args.dry_run:
        return dry_run(engine_args, args.served_model_name)
    if engine_args.node_rank > 0:
        return run_headless(engine_args)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("shutdown_timeout", "timeout_keep_alive", "timeout_request_read"):
        if not getattr(args, flag) > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
    ignored = engine_args.ignored()
    if ignored:
        print(f"mgpu serve: {ignored}", flush=True)
    sock = _bind(args.host, args.port)
    try:
        engine = LLMEngine.from_engine_args(engine_args)
    except BaseException:
        sock.close()
        raise
    name, aliases = served_names(args.served_model_name, args.model, engine.model_path)
    try:
        check_served_names(engine.lora_names, (name, *aliases))
        config = ServerConfig(
            served_model_name=name,
            model_aliases=aliases,
            api_key=args.api_key or None,
            max_request_bytes=args.max_request_bytes,
            max_n=args.max_n,
            monitor=MonitorConfig.from_cli_args(args),
        )
    except (ValueError, ConfigError) as exc:
        engine.shutdown()
        sock.close()
        raise ConfigError(str(exc)) from None
    async_engine = AsyncEngine(engine)
    try:
        app = build_app(async_engine, config)
        url = _url(sock)
        _print_report(engine, config, url)
        if config.api_key is None and not _is_loopback(args.host):
            print(
                f"warning: --host {args.host} accepts connections from other machines and no "
                f"--api-key is set: anyone who can reach this port can use the model",
                file=sys.stderr,
                flush=True,
            )
        settings = {
            "log_level": (args.uvicorn_log_level or getattr(args, "log_level", "warning")).lower(),
            "timeout_keep_alive": args.timeout_keep_alive,
            "timeout_request_read": args.timeout_request_read,
            "shutdown_timeout": args.shutdown_timeout,
        }
        serve(app, app.state.serving, sock, settings)
    finally:
        # The app already stopped the engine on a normal shutdown (before uvicorn re-raises the
        # SIGINT/SIGTERM that ended it); this covers failures on the way up.
        async_engine.shutdown()
        sock.close()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: one the OS picks).

    The socket is made with ``IPPROTO_TCP`` named explicitly: asyncio sets ``TCP_NODELAY`` only on
    connections whose protocol says TCP, and without it Nagle's algorithm holds each small
    server-sent event back until the client's delayed ACK, some 40 ms.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _print_report(engine: Any, config: Any, url: str) -> None:
    """What start-up did: the model, each rank's share, the KV cache, and where to connect."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    max_len = engine.scheduler_config.max_model_len
    pc = engine.parallel_config
    title = (
        f"{config.served_model_name}: {engine.model_path} on {engine.device}, "
        f"{str(engine.dtype).removeprefix('torch.')}, TP {pc.tensor_parallel_size} x "
        f"PP {pc.pipeline_parallel_size}"
    )
    layout = Table(title=title, title_justify="left")
    columns = ("rank", "node", "device", "layers", "params (MB)", "predicted (MB)", "KV blocks")
    for column in columns:
        layout.add_column(column, justify="left" if column == "device" else "right")
    for row in engine.layout():
        first, end = row["layers"]
        layout.add_row(
            str(row["rank"]),
            str(row["node"]),
            row["device"],
            f"[{first}, {end})",
            f"{row['param_bytes'] / 1e6:.1f}",
            f"{row['predicted_param_bytes'] / 1e6:.1f}",
            str(row["kv_blocks"]),
        )
    console.print(layout)
    cache = engine.cache_config
    tokens = engine.num_kv_tokens
    console.print(
        f"KV cache: {engine.block_manager.num_blocks} blocks x {cache.block_size} tokens = "
        f"{tokens} tokens; max concurrency at full context ({max_len} tokens): "
        f"{tokens / max_len:.2f}x",
        soft_wrap=True,
    )
    for name in engine.lora_names:
        console.print(
            f"LoRA adapter {name} ({engine.lora_path(name)}): request it as model '{name}'",
            soft_wrap=True,
        )
    auth = "API key required on /v1/* and /docs" if config.api_key else "no API key"
    console.print(f"{auth}; request bodies up to {config.max_request_bytes} bytes", soft_wrap=True)
    # One plain line, never wrapped, for people and for scripts that wait for it.
    print(f"mgpu serve: listening on {url} (OpenAI API at {url}/v1)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mgpu.serve [flags]``: the same as ``mgpu serve [flags]``.

    Args:
        argv: the flags (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m mgpu.serve", description="The same as `mgpu serve`."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_serve_command(parser)
    return run_command(parser.parse_args(argv), run_server)


if __name__ == "__main__":
    sys.exit(main())
