"""Serving throughput of ``mgpu serve`` at 1, 8 and 32 concurrent clients, beside transformers.

Question: how much does continuous batching buy over one client at a time, and over the static
batches of ``transformers`` ``generate()``? Each client streams greedy completions (EOS ignored) of
mixed lengths, as real traffic has, or of one length (``--workloads``) through
``/v1/completions``, ``--rounds`` requests one after the other; the aggregate
rate is all output tokens over the wall time, and the time to first token (TTFT) is measured by the
client from sending the request to its first streamed text. The peer runs the same prompts on the
same weights with left padding, batch size = number of clients, its TTFT taken when ``generate()``
hands its streamer the first new tokens.

Run: ``python benchmarks/serve_throughput.py`` (writes the serve_throughput_cpu section of
docs/benchmarks.md and docs/img/serve_throughput.png; ``--device cuda`` for a GPU). On CPU the
server keeps one core for itself (``--cpu-reserved-cores``); on a machine whose cores other jobs
also use, ``OMP_WAIT_POLICY=PASSIVE`` for both engines keeps spinning OpenMP threads from stalling,
and the command line recorded in the table says whether it was set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from common import ROOT, machine_line, markers, write_section
from mgpu.models.loader import demo_model_path

PROMPTS = [
    "The Python interpreter",
    "A list is",
    "Return the number of",
    "This module provides",
    "The following functions",
    "An exception is raised when",
    "The default value of",
    "If the argument is",
    "A dictionary maps",
    "The file object",
    "This method returns",
    "The string is",
    "When the iterator",
    "The class attribute",
    "Each thread",
    "The result is",
]


#: Completion lengths of the mixed workload, cycled over the requests (mean 65 tokens).
MIXED_LENGTHS = [16, 128, 32, 96, 64, 24, 112, 48]


@dataclass
class Run:
    """One engine at one concurrency on one workload."""

    workload: str
    engine: str
    clients: int
    requests: int
    output_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Aggregate output tokens per second."""
        return self.output_tokens / self.seconds

    def ttft_ms(self, q: float) -> float:
        """A percentile of the time to first token, in milliseconds."""
        return float(np.percentile(self.ttft, q)) * 1000


def prompts_for(clients: int, rounds: int) -> list[list[str]]:
    """The prompts of each round: ``clients`` of them, cycling through PROMPTS."""
    return [
        [PROMPTS[(r * clients + c) % len(PROMPTS)] for c in range(clients)] for r in range(rounds)
    ]


def lengths_for(workload: str, clients: int, rounds: int, max_tokens: int) -> list[list[int]]:
    """Completion lengths of each round: all ``max_tokens`` (uniform) or cycling MIXED_LENGTHS."""
    if workload == "uniform":
        return [[max_tokens] * clients for _ in range(rounds)]
    n = len(MIXED_LENGTHS)
    return [[MIXED_LENGTHS[(r * clients + c) % n] for c in range(clients)] for r in range(rounds)]


# ---- mgpu serve ----------------------------------------------------------------------------------


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    """``python -m mgpu.serve`` on a free port; returns the process and its URL."""
    cmd = [
        *(sys.executable, "-m", "mgpu.serve", "--device", args.device, "--port", "0"),
        *("--model", str(args.model), "--max-model-len", str(args.max_model_len)),
        *("--max-num-seqs", "64", "--num-gpu-blocks-override", str(args.num_blocks)),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, match.group(1)
    raise RuntimeError(f"mgpu serve exited with status {proc.wait()}")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, int]:
    """Stream one completion; returns (time to first token, completion tokens)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and any(c["text"] for c in event["choices"]):
                first = time.perf_counter() - sent
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    assert first is not None and tokens == max_tokens
    return first, tokens


async def run_mgpu(url: str, clients: int, rounds: int, workload: str, max_tokens: int) -> Run:
    """``clients`` concurrent clients, each sending ``rounds`` requests one after the other."""
    plan = prompts_for(clients, rounds)
    lengths = lengths_for(workload, clients, rounds, max_tokens)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, PROMPTS[0], 4)  # warm-up

        async def user(c: int) -> list[tuple[float, int]]:
            return [await one_request(client, plan[r][c], lengths[r][c]) for r in range(rounds)]

        start = time.perf_counter()
        results = await asyncio.gather(*(user(c) for c in range(clients)))
        seconds = time.perf_counter() - start
    flat = [item for per_user in results for item in per_user]
    return Run(
        workload,
        "mgpu serve",
        clients,
        len(flat),
        sum(t for _, t in flat),
        seconds,
        [f for f, _ in flat],
    )


# ---- transformers --------------------------------------------------------------------------------


class _FirstTokenClock:
    """A ``generate()`` streamer that notes when the first new tokens arrive."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.calls = 0
        self.first: float | None = None

    def put(self, _: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def run_transformers(
    model_path: Path, device: str, clients: int, rounds: int, workload: str, max_tokens: int
) -> Run:
    """The same prompts in static batches of ``clients``, left-padded.

    A static batch runs until its longest completion is done; only the tokens each request asked
    for count as output (the rest is the waste continuous batching avoids).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()

    def generate(prompts: list[str], new_tokens: int) -> tuple[float, int]:
        batch = tok(prompts, return_tensors="pt", padding=True).to(device)
        clock = _FirstTokenClock()
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                streamer=clock,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert clock.first is not None
        return clock.first, (out.shape[1] - batch.input_ids.shape[1]) * len(prompts)

    generate(PROMPTS[:clients], 4)  # warm-up
    ttft, tokens = [], 0
    start = time.perf_counter()
    lengths = lengths_for(workload, clients, rounds, max_tokens)
    for prompts, wanted in zip(prompts_for(clients, rounds), lengths, strict=True):
        first, _ = generate(prompts, max(wanted))
        ttft += [first] * len(prompts)
        tokens += sum(wanted)
    seconds = time.perf_counter() - start
    return Run(workload, "transformers", clients, clients * rounds, tokens, seconds, ttft)


# ---- report --------------------------------------------------------------------------------------


def render(runs: list[Run], command: str, device: str) -> str:
    """The markdown section: machine, command, table, plot."""
    start, end = markers("serve_throughput", device)
    title = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    machine = f"{machine_line(device)}, {torch.get_num_threads()} torch threads for transformers"
    single = {(r.workload, r.engine): r.tokens_per_s for r in runs if r.clients == 1}
    peer = {(r.workload, r.clients): r.tokens_per_s for r in runs if r.engine == "transformers"}
    lines = [
        start,
        f"## Serving throughput ({title}, demo model)",
        "",
        f"Machine: {machine}.",
        "",
        f"Command: `{command}`",
        "",
        "| workload | clients | engine | requests | output tokens/s | vs 1 client "
        "| vs transformers | TTFT p50 (ms) | TTFT p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.workload} | {r.clients} | {r.engine} | {r.requests} | {r.tokens_per_s:.1f} | "
            f"{r.tokens_per_s / single[(r.workload, r.engine)]:.2f}x | "
            f"{r.tokens_per_s / peer[(r.workload, r.clients)]:.2f}x | "
            f"{r.ttft_ms(50):.0f} | {r.ttft_ms(99):.0f} |"
        )
    lines += [
        "",
        "Each client streams greedy completions (EOS ignored) one after the other; output "
        "tokens/s is the aggregate over all clients. In the *mixed* workload completions are "
        f"{min(MIXED_LENGTHS)} to {max(MIXED_LENGTHS)} tokens long (cycling "
        f"{', '.join(map(str, MIXED_LENGTHS))}), as real traffic is; in the *uniform* one every "
        "request asks for the same length, the best case for static batching. transformers runs "
        "the same prompts as static, left-padded batches of size = clients, each until its "
        "longest completion is done; only the tokens a request asked for count. Its TTFT is the "
        "time its batch takes to produce the first new tokens. The server, its worker and the "
        "clients share the machine's cores; on a machine shared with other jobs the numbers "
        "vary by a quarter or so from run to run.",
        "",
        f"![throughput and time to first token](img/{plot_name(device)})",
        end,
    ]
    return "\n".join(lines)


def plot_name(device: str) -> str:
    """The plot's file name under docs/img/."""
    return "serve_throughput.png" if device == "cpu" else f"serve_throughput_{device}.png"


def plot(runs: list[Run], path: Path, title: str) -> None:
    """Throughput and median TTFT against the number of clients, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, workload in dict.fromkeys((r.engine, r.workload) for r in runs):
        mine = [r for r in runs if r.engine == engine and r.workload == workload]
        x = [r.clients for r in mine]
        style = "-" if workload == "mixed" else "--"
        label = f"{engine} ({workload})"
        left.plot(x, [r.tokens_per_s for r in mine], style, marker="o", label=label)
        right.plot(x, [r.ttft_ms(50) for r in mine], style, marker="o", label=label)
    for ax, label in ((left, "output tokens/s (all clients)"), (right, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.clients for r in runs}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"mgpu serve vs transformers generate(), demo model, {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    """Measure both engines at every concurrency, then write the table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=demo_model_path())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument(
        "--rounds", type=int, default=6, help="requests per client (more: less start-up and tail)"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens, uniform workload")
    parser.add_argument(
        "--workloads",
        default="mixed,uniform",
        help="mixed: completion lengths 16..128 (mean 65); uniform: all --max-tokens",
    )
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=1024, help="KV-cache blocks of 16")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    workloads = args.workloads.split(",")
    proc, url = start_server(args)
    runs = []
    try:
        for workload in workloads:
            for clients in levels:
                run = asyncio.run(run_mgpu(url, clients, args.rounds, workload, args.max_tokens))
                print(
                    f"{workload} mgpu serve {clients:3d}: {run.tokens_per_s:8.1f} tok/s", flush=True
                )
                runs.append(run)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    for workload in workloads:
        for clients in levels:
            run = run_transformers(
                args.model, args.device, clients, args.rounds, workload, args.max_tokens
            )
            print(
                f"{workload} transformers {clients:3d}: {run.tokens_per_s:8.1f} tok/s", flush=True
            )
            runs.append(run)

    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY",) if k in os.environ)
    command = f"{env} python benchmarks/serve_throughput.py {' '.join(sys.argv[1:])}"
    text = render(runs, command.strip(), args.device)
    print(text)
    if not args.no_write:
        title = "CPU" if args.device == "cpu" else torch.cuda.get_device_name()
        plot(runs, ROOT / "docs" / "img" / plot_name(args.device), title)
        write_section(text, "serve_throughput", args.device)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
