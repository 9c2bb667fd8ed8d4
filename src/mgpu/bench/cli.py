"""``mgpu bench``: flags and the top-level flow (one server, a local sweep, or a comparison).

Examples::

    mgpu bench --url http://127.0.0.1:8000 --concurrency 1,8,32 --json mgpu.json --plot mgpu.png
    mgpu bench --url http://127.0.0.1:8080 --model llama --request-rate 2,8 --num-prompts 200
    mgpu bench --local --sweep tp=1,2 --serve-args "--device cpu" --concurrency 1,16
    mgpu bench --compare mgpu.json llamacpp.json --plot both.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from mgpu.bench.report import (
    compare_table,
    format_table,
    load_document,
    plot,
    run_document,
    summarize_level,
    to_csv,
)
from mgpu.bench.runner import run_level
from mgpu.bench.workload import BenchRequest, file_requests, synthetic_requests
from mgpu.errors import ConfigError


def _numbers(kind: type, text: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,32, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags.

    Args:
        parser: the subcommand's parser.
    """
    target = parser.add_argument_group("target")
    target.add_argument("--url", help="base URL of an OpenAI-compatible server")
    target.add_argument(
        "--model",
        help="the model field (remote: default the first of /v1/models; --local: the model to "
        "serve, default the bundled demo)",
    )
    target.add_argument(
        "--endpoint",
        default="completions",
        choices=("completions", "chat"),
        help="/v1/completions or /v1/chat/completions",
    )
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    target.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before a request counts as an error"
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=lambda s: _numbers(int, s),
        help="clients in a closed loop, one level each, e.g. 1,8,32 (default: 1,8,32); with "
        "--request-rate: the cap on requests in flight",
    )
    load.add_argument(
        "--request-rate",
        type=lambda s: _numbers(float, s),
        help="Poisson arrivals per second, one level each, e.g. 2,8 (inf: all at once)",
    )
    load.add_argument(
        "--num-prompts", type=int, help="requests per level (default: 4 per client, at least 16)"
    )
    load.add_argument("--prompt-len", default="128", help="prompt words: N or LO-HI (uniform)")
    load.add_argument(
        "--output-len", help="tokens asked for: N or LO-HI (default: 128, or the dataset's)"
    )
    load.add_argument(
        "--dataset", type=Path, help='JSONL of {"prompt": ..., "max_tokens": ...} per line'
    )
    load.add_argument(
        "--shared-prefix-words",
        type=int,
        default=0,
        help="words of one prefix common to every prompt (a system prompt)",
    )
    load.add_argument("--seed", type=int, default=0, help="seed of the lengths and arrivals")
    load.add_argument(
        "--warmup", type=int, default=1, help="requests sent (and not counted) before level one"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the run as JSON (a sweep: one per layout)")
    out.add_argument("--csv", type=Path, help="write one CSV row per level")
    out.add_argument("--plot", type=Path, help="PNG of throughput and latency against load")
    out.add_argument("--label", help="name of this run in tables and plots (default: the URL)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="show runs saved with --json side by side (the first is the baseline) and exit",
    )
    local = parser.add_argument_group("local sweep")
    local.add_argument(
        "--local", action="store_true", help="start `mgpu serve` here per layout of --sweep"
    )
    local.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="serve flag values to compare, e.g. tp=1,2 (tp, pp or any serve flag; repeatable)",
    )
    local.add_argument(
        "--serve-args", default="", help='more `mgpu serve` flags, e.g. "--device cpu"'
    )
    parser.set_defaults(handler=run_bench)


def _requests(args: argparse.Namespace, count: int) -> list[BenchRequest]:
    if args.dataset is not None:
        return file_requests(args.dataset, count, args.output_len)
    return synthetic_requests(
        count, args.prompt_len, args.output_len or "128", args.seed, args.shared_prefix_words
    )


def _levels(args: argparse.Namespace) -> list[tuple[int | None, float | None]]:
    if args.request_rate:
        cap = args.concurrency[0] if args.concurrency else None
        if args.concurrency and len(args.concurrency) > 1:
            raise ConfigError("with --request-rate, --concurrency takes one cap, not a list")
        return [(cap, rate) for rate in args.request_rate]
    return [(c, None) for c in (args.concurrency or [1, 8, 32])]


def bench_server(args: argparse.Namespace, url: str, model: str, label: str) -> dict[str, Any]:
    """Run every level against one server; returns the run's JSON document.

    Args:
        args: parsed ``bench`` flags.
        url: the server's base URL.
        model: the ``model`` field.
        label: the run's name.
    """
    levels = []
    common = {
        "endpoint": args.endpoint,
        "api_key": args.api_key,
        "timeout": args.timeout,
        "progress": not args.no_progress,
    }
    if args.warmup > 0:
        warm = _requests(args, args.warmup)
        asyncio.run(run_level(url, model, warm, concurrency=1, **{**common, "progress": False}))
    for concurrency, rate in _levels(args):
        count = args.num_prompts or max(16, 4 * (concurrency or 4))
        name = f"c={concurrency}" if rate is None else f"rate={rate:g}/s"
        run = asyncio.run(
            run_level(
                url,
                model,
                _requests(args, count),
                concurrency=concurrency,
                request_rate=rate,
                seed=args.seed,
                label=f"{label} {name}",
                **common,
            )
        )
        levels.append(summarize_level(run))
    meta = {
        "label": label,
        "url": url,
        "model": model,
        "endpoint": args.endpoint,
        "prompt_len": None if args.dataset else args.prompt_len,
        "output_len": args.output_len,
        "dataset": str(args.dataset) if args.dataset else None,
        "shared_prefix_words": args.shared_prefix_words,
        "seed": args.seed,
    }
    return run_document(meta, levels)


def _write(args: argparse.Namespace, docs: list[tuple[str, dict[str, Any]]]) -> None:
    if args.json is not None:
        if len(docs) == 1:
            args.json.write_text(json.dumps(docs[0][1], indent=2) + "\n")
        else:
            for label, doc in docs:
                path = args.json.with_name(f"{args.json.stem}-{label}{args.json.suffix}")
                path.write_text(json.dumps(doc, indent=2) + "\n")
    if args.csv is not None:
        parts = [to_csv(doc) for _, doc in docs]
        args.csv.write_text(parts[0] + "".join(p.split("\n", 1)[1] for p in parts[1:]))
    if args.plot is not None:
        plot(docs, args.plot)


def run_bench(args: argparse.Namespace) -> int:
    """Run ``mgpu bench`` (see the module docstring).

    Args:
        args: parsed ``bench`` flags.
    """
    from mgpu.bench.local import layout_label, local_server, parse_sweeps, served_model, verdict

    if args.compare:
        docs = [(path.stem, load_document(path)) for path in args.compare]
        print(compare_table(docs))
        if args.plot is not None:
            plot(docs, args.plot)
        return 0
    if args.local:
        if args.url:
            raise ConfigError("--local starts its own servers; leave out --url")
        docs = []
        for flags in parse_sweeps(args.sweep):
            label = layout_label(flags) if flags or not args.label else args.label
            serve = shlex.split(args.serve_args) + [x for pair in flags for x in pair]
            if args.model:
                serve = ["--model", args.model, *serve]
            print(f"starting mgpu serve {shlex.join(serve)}", file=sys.stderr)
            with local_server(serve) as server:
                doc = bench_server(args, server.url, served_model(server.url), label)
            print(f"\n{label}\n{format_table(doc)}")
            docs.append((label, doc))
        if len(docs) > 1:
            print("\n" + compare_table(docs) + "\n\n" + verdict(docs))
        _write(args, docs)
        return 0
    if not args.url:
        raise ConfigError("give --url of a server, --local to start one, or --compare files")
    model = args.model or served_model(args.url)
    doc = bench_server(args, args.url, model, args.label or args.url)
    print(format_table(doc))
    _write(args, [(args.label or "run", doc)])
    return 0
