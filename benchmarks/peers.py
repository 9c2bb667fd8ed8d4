"""mgpu beside transformers and llama.cpp's server on the same weights, machine and threads.

Question: on this machine, which engine decodes one stream fastest, which serves 8 and 32
clients best, and how close does each get to the memory-bandwidth limit? Per model and dtype:

- **mgpu**: ``python -m mgpu.serve`` (``mgpu bench``'s ``LocalServer``) with the settings a user
  gets without flags (plus ``--mgpu-flags``), loaded through HTTP by ``mgpu bench``'s own client.
- **llama.cpp**: llama.cpp's own ``llama-server`` (``--llama-server``: one slot per client of the
  largest level, continuous batching), or else llama-cpp-python's ``llama_cpp.server``
  (``--llama-python``, which serves one request at a time, so its 8- and 32-client rows show a
  queue), on a GGUF written from the same random HF weights (``tests/quant/gguf_files.py``,
  llama.cpp's converter layout), F32, F16 or BF16, with the same thread count, loaded by the same
  client.
- **transformers**: ``generate()`` in this process, static batches of 8 and 32 prompts (left
  padded), its TTFT the time of a one-token ``generate()`` of the batch.

Single-stream decode tokens/s is n / (time of 1 + n tokens - time of 1), whole requests (HTTP
engines) or ``generate()`` calls (transformers); its fraction of the bandwidth limit is
weight bytes x tokens/s over this machine's measured read bandwidth. Greedy, every token asked
for: mgpu and transformers ignore EOS, and llama.cpp's requests, which have no ``ignore_eos``,
ban the EOS tokens with ``logit_bias``.

Setup of the llama.cpp side (once; it builds llama.cpp from source, minutes). ``llama-server``
from the llama.cpp sources vendored in llama-cpp-python's source distribution (PyPI only, no git)::

    scripts/build_llama_server.sh        # prints the binary's path last

or llama-cpp-python's server in a venv::

    python -m venv /work/llamavenv
    /work/llamavenv/bin/pip install 'llama-cpp-python[server]'

Run: ``python benchmarks/peers.py --llama-server "$(scripts/build_llama_server.sh | tail -1)"``
(writes the peers_cpu section of docs/benchmarks.md and docs/img/peers.png). Without
``--llama-server`` or ``--llama-python``, or when neither can run, the llama.cpp rows say why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from common import ROOT, machine_line, markers, write_section
from decode_speed import make_big_model, memory_bandwidth_gbs, weight_bytes_read
from mgpu.bench.local import LocalServer
from mgpu.bench.runner import LevelRun, run_level
from mgpu.bench.workload import synthetic_requests
from mgpu.models.loader import demo_model_path

sys.path.insert(0, str(ROOT / "tests" / "quant"))
# A test helper: GGUF files in llama.cpp converter layout.
from gguf_files import T, write_gguf

GGUF_TYPES = {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16}


@dataclass
class Row:
    """One engine on one model and dtype: single stream, then each client count."""

    model: str
    engine: str
    dtype: str
    decode_tps: float | None = None
    throughput: dict[int, float] = field(default_factory=dict)  # clients -> output tokens/s
    ttft_ms: dict[int, float] = field(default_factory=dict)  # clients -> mean TTFT
    errors: int = 0
    note: str = ""


# ---- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_problem(args: argparse.Namespace) -> str | None:
    """Why llama.cpp cannot run (None when it can): ``--llama-server`` must be an executable,
    ``--llama-python`` an interpreter importing ``llama_cpp.server``."""
    if args.llama_server is not None:
        if not os.access(args.llama_server, os.X_OK):
            return f"not run: {args.llama_server} is not an executable llama-server"
        return None
    python = args.llama_python
    if python is None:
        return "not run: no --llama-server or --llama-python given (see the setup above)"
    try:
        subprocess.run(
            [python, "-c", "import llama_cpp.server"], check=True, capture_output=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not run: {python} cannot import llama_cpp.server ({type(exc).__name__})"
    return None


def launch_server(name: str, cmd: list[str], port: int) -> tuple[subprocess.Popen[bytes], str]:
    """Start a peer's server (``cmd``, listening on ``port``) and poll its /v1/models until it
    answers 200; its exit or 300 s without an answer is an error."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not answer within 300 s")


def start_llama_server(
    binary: str, gguf: Path, threads: int, slots: int
) -> tuple[subprocess.Popen[bytes], str]:
    """llama.cpp's ``llama-server`` with ``slots`` parallel slots of 512 tokens each (continuous
    batching is its default); returns the process and its URL."""
    port = free_port()
    cmd = [
        *(binary, "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("--threads", str(threads), "--threads-batch", str(threads)),
        *("--parallel", str(slots), "--ctx-size", str(512 * slots), "--alias", "peer"),
    ]
    return launch_server("llama-server", cmd, port)


def start_llama(python: str, gguf: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    """llama-cpp-python's OpenAI server on ``gguf``; returns the process and its URL."""
    port = free_port()
    cmd = [
        *(python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)),
        *("--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096"),
        *("--model_alias", "peer"),
    ]
    return launch_server("llama_cpp.server", cmd, port)


def eos_bias(path: Path) -> dict:
    """``logit_bias`` banning the model's EOS tokens: how a server without ``ignore_eos`` is made
    to generate every token asked for."""
    eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return {"logit_bias": {str(i): -100 for i in ids}}


def measure_server(
    row: Row, url: str, model: str, args: argparse.Namespace, extra: dict | None = None
) -> None:
    """Single-stream decode rate, then throughput and TTFT at each client count, into ``row``."""

    def level(requests: list, clients: int) -> LevelRun:
        return asyncio.run(
            run_level(url, model, requests, concurrency=clients, progress=False, extra_body=extra)
        )

    level(synthetic_requests(2, "8", "8", seed=1), 1)  # warm-up
    # Decode rate from whole-request latencies of 1 and 1 + n tokens, as for transformers: a
    # random model's tokens may detokenise to nothing (the ~140M model's 32000 ids against the
    # demo tokenizer's 4096), and streamed chunks without text carry no timing.
    latency = {}
    for n in (1, 1 + args.new_tokens):
        run = level(synthetic_requests(args.single_requests, "16", str(n), seed=2), 1)
        ok = [r.latency for r in run.results if r.ok and r.output_tokens == n]
        row.errors += len(run.results) - len(ok)
        latency[n] = float(np.mean(ok)) if ok else None
    one, full = latency[1], latency[1 + args.new_tokens]
    row.decode_tps = args.new_tokens / (full - one) if one and full and full > one else None
    for clients in args.clients:
        reqs = synthetic_requests(clients * args.rounds, "16", str(args.new_tokens), seed=clients)
        run = level(reqs, clients)
        ok = [r for r in run.results if r.ok]
        row.errors += len(run.results) - len(ok)
        row.throughput[clients] = sum(r.output_tokens for r in ok) / run.duration
        row.ttft_ms[clients] = 1000 * float(np.mean([r.ttft for r in ok if r.ttft is not None]))


def stop(proc: subprocess.Popen) -> None:
    """End a server this benchmark started."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- transformers -------------------------------------------------------------------------------


def measure_transformers(row: Row, path: Path, args: argparse.Namespace) -> None:
    """Single-stream decode and static batches of each client count, in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, row.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def generate(prompts: list[str], n: int) -> float:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad
            )
        return time.perf_counter() - start

    prompts = [r.prompt for r in synthetic_requests(max(args.clients), "16", "1", seed=3)]
    generate(prompts[:1], 4)  # warm-up
    one = min(generate(prompts[:1], 1) for _ in range(3))
    full = min(generate(prompts[:1], 1 + args.new_tokens) for _ in range(2))
    row.decode_tps = args.new_tokens / (full - one)
    for clients in args.clients:
        batch = prompts[:clients]
        row.ttft_ms[clients] = 1000 * generate(batch, 1)
        row.throughput[clients] = clients * args.new_tokens / generate(batch, args.new_tokens)


# ---- report -------------------------------------------------------------------------------------


def render(rows: list[Row], bandwidth: float, weight_bytes: dict, args: argparse.Namespace) -> str:
    """The markdown section: machine, command, table, plot."""
    start, end = markers("peers", "cpu")
    # The llama-server binary as the set-up prints it, not this machine's cache path.
    setup = '"$(scripts/build_llama_server.sh | tail -1)"'
    command = "python benchmarks/peers.py " + " ".join(
        setup if a == args.llama_server else shlex.quote(a) for a in sys.argv[1:]
    )
    head = " | ".join(f"{c} clients tok/s | TTFT {c} (ms)" for c in args.clients)
    lines = [
        start,
        "## Peers: mgpu, transformers and llama.cpp on the same weights (CPU)",
        "",
        f"Machine: {machine_line('cpu')}; {args.threads} threads per engine; measured read "
        f"bandwidth {bandwidth:.1f} GB/s.",
        "",
        f"Command: `{command}`" + (" (OMP_WAIT_POLICY=PASSIVE)" if _passive() else ""),
        "",
        f"| model | engine | dtype | decode tok/s | of bandwidth limit | {head} | errors |",
        "|---|---|---|---|---|" + "---|---|" * len(args.clients) + "---|",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.model} | {r.engine} | {r.dtype} | {r.note} |")
            continue
        limit = bandwidth * 1e9 / weight_bytes[(r.model, r.dtype)]
        tps = f"{r.decode_tps:.1f}" if r.decode_tps else "-"
        frac = f"{r.decode_tps / limit:.0%}" if r.decode_tps else "-"
        cells = " | ".join(
            f"{r.throughput.get(c, 0):.1f} | {r.ttft_ms.get(c, 0):.0f}" for c in args.clients
        )
        lines.append(
            f"| {r.model} | {r.engine} | {r.dtype} | {tps} | {frac} | {cells} | {r.errors} |"
        )
    lines += [
        "",
        "Bandwidth limit = measured read bandwidth / weight bytes per token (batch-1 decode reads "
        "every weight once). "
        + (
            f"llama.cpp is its own `llama-server` with {max(args.clients)} parallel slots "
            "(continuous batching); "
            if args.llama_server is not None
            else "llama.cpp is llama-cpp-python's server, which serves one request at a time, "
            "so at 8 and 32 clients its throughput is its single-stream rate and its TTFT a "
            "queue; "
        )
        + "transformers "
        "runs static batches in-process (no HTTP). mgpu runs with its defaults"
        + (f" plus `{' '.join(args.mgpu_flags)}`" if args.mgpu_flags else "")
        + ".",
        "",
        "![peers](img/peers.png)",
        end,
    ]
    return "\n".join(lines)


def plot(rows: list[Row], clients: list[int], out: Path) -> None:
    """One row of panels per model (single-stream decode, then each client count), bars grouped
    by dtype, one colour per engine: the models' speeds differ tenfold, so each gets its own
    scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not r.note]
    models = list(dict.fromkeys(r.model for r in measured))
    engines = list(dict.fromkeys(r.engine for r in measured))
    panels = ["decode (1 stream)", *(f"{c} clients" for c in clients)]
    fig, axes = plt.subplots(
        len(models), len(panels), figsize=(4 * len(panels), 3.2 * len(models)), squeeze=False
    )
    colors = {"mgpu": "#4C72B0", "transformers": "#DD8452", "llama.cpp": "#55A868"}
    width = 0.8 / max(1, len(engines))
    for row_axes, model in zip(axes, models, strict=True):
        dtypes = list(dict.fromkeys(r.dtype for r in measured if r.model == model))
        for ax, panel in zip(row_axes, panels, strict=True):
            for e, engine in enumerate(engines):
                values = []
                for dtype in dtypes:
                    row = next(
                        (
                            r
                            for r in measured
                            if (r.model, r.engine, r.dtype) == (model, engine, dtype)
                        ),
                        None,
                    )
                    if row is None:
                        values.append(0.0)
                    elif panel.startswith("decode"):
                        values.append(row.decode_tps or 0.0)
                    else:
                        values.append(row.throughput.get(int(panel.split()[0]), 0.0))
                xs = [i + (e - (len(engines) - 1) / 2) * width for i in range(len(dtypes))]
                ax.bar(xs, values, width, color=colors.get(engine), label=engine)
            ax.set_xticks(range(len(dtypes)), dtypes)
            ax.set_title(f"{model}: {panel}", fontsize=10)
            ax.set_ylabel("output tokens/s")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def _passive() -> bool:
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def main() -> None:
    """Run every engine on every model and dtype, then write the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo", "llama-140m"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--engines", nargs="+", default=["mgpu", "transformers", "llama.cpp"])
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary (preferred)")
    parser.add_argument("--llama-python", help="python of a venv with llama-cpp-python[server]")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=3)
    parser.add_argument(
        "--mgpu-flags", type=shlex.split, default=[], help="extra mgpu serve flags, one string"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    problem = llama_problem(args) if "llama.cpp" in args.engines else None
    bandwidth = memory_bandwidth_gbs(args.threads, "cpu")
    rows: list[Row] = []
    weight_bytes: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = demo_model_path() if name == "demo" else make_big_model(Path(tmp) / name)
            for dtype in args.dtypes:
                weight_bytes[(name, dtype)] = weight_bytes_read(path, getattr(torch, dtype))
                for engine in args.engines:
                    row = Row(name, engine, dtype)
                    rows.append(row)
                    print(f"{name} {dtype} {engine} ...", file=sys.stderr, flush=True)
                    if engine == "transformers":
                        measure_transformers(row, path, args)
                    elif engine == "mgpu":
                        server = LocalServer(
                            [
                                *("--device", "cpu", "--model", str(path), "--dtype", dtype),
                                *("--max-model-len", "512", *args.mgpu_flags),
                            ]
                        )
                        try:
                            measure_server(row, server.url, str(path), args)
                        finally:
                            server.stop()
                    elif problem is not None:
                        row.note = problem
                    else:
                        gguf = Path(tmp) / f"{name}-{dtype}.gguf"
                        write_gguf(path, gguf, GGUF_TYPES[dtype])
                        if args.llama_server is not None:
                            slots = max(args.clients)
                            proc, url = start_llama_server(
                                args.llama_server, gguf, args.threads, slots
                            )
                        else:
                            proc, url = start_llama(args.llama_python, gguf, args.threads)
                        try:
                            measure_server(row, url, "peer", args, eos_bias(path))
                        finally:
                            stop(proc)
    text = render(rows, bandwidth, weight_bytes, args)
    print(text)
    if not args.no_write:
        write_section(text, "peers", "cpu")
        plot(rows, args.clients, ROOT / "docs" / "img" / "peers.png")


if __name__ == "__main__":
    main()
