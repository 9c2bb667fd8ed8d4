"""Pipeline parallelism with steps in flight against one step at a time, on CPU, in one run.

Question: with PP=2, how much of the pipeline bubble do micro-batches in flight remove? One step
at a time (``max_steps_in_flight=1``) leaves one stage idle whenever the other computes; with two
disjoint micro-batches in flight both stages work at once. Ideally that is 2x the throughput; the
bubble fraction reported is ``1 - speedup / pp_size`` (the share of stage time still idle compared
with a perfect pipeline). Also: single-stream latency at TP=2 against PP=2.

Model: a ~57M random Llama (hidden 768, 8 layers, 12 heads, 4 KV heads, intermediate 2048, the demo
model's 8k tokenizer vocabulary), float32, so compute dominates over per-step overhead.

Run: ``python benchmarks/pipeline_overlap.py`` (writes docs/benchmarks.md's pipeline section);
``--num-seqs 4 --new-tokens 4 --rounds 1 --serve-clients 4 --no-write`` is a quick check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import machine_line, markers, write_section
from mgpu import LLM, SamplingParams
from mgpu.config import ModelConfig
from mgpu.models.loader import demo_model_path
from serve_throughput import run_mgpu

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "eos_token_id": 0,
}


def make_model(path: Path) -> Path:
    """Write the random Llama with the demo model's tokenizer (its vocabulary size)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(CONFIG)
    fields["vocab_size"] = ModelConfig.from_file(demo_model_path()).vocab_size
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((demo_model_path() / name).read_bytes())
    return path


def throughput(llm: LLM, num_seqs: int, new_tokens: int, rounds: int) -> float:
    """Best generated tokens/s of ``rounds`` runs of ``num_seqs`` concurrent sequences."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [10 + i, 20 + i, 30 + i, 40 + i]} for i in range(num_seqs)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    return best


def serve_throughput(path: Path, flags: list[str], clients: int, tokens: int, rounds: int) -> float:
    """Aggregate output tokens/s of ``clients`` streaming clients against ``mgpu serve``.

    Args:
        path: the model.
        flags: ``mgpu serve`` flags beside the model and the port.
        clients: concurrent clients.
        tokens: completion length (EOS ignored).
        rounds: requests each client sends one after the other.
    """
    cmd = [sys.executable, "-m", "mgpu.serve", str(path), "--port", "0", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                run = asyncio.run(run_mgpu(match.group(1), clients, rounds, "uniform", tokens))
                return run.tokens_per_s
        raise RuntimeError(f"mgpu serve exited with status {proc.wait()}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, and write it into docs/benchmarks.md unless --no-write."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve-clients", type=int, default=32, help="streaming clients")
    parser.add_argument("--serve-rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp))
        common = {"device": "cpu", "dtype": "float32", "num_blocks": 256, "max_model_len": 512}
        for label, kwargs in (
            ("PP=2, one step at a time", {"pipeline_parallel_size": 2, "max_steps_in_flight": 1}),
            ("PP=2, 2 steps in flight", {"pipeline_parallel_size": 2, "max_steps_in_flight": 2}),
        ):
            with LLM(str(path), **common, **kwargs) as llm:
                tps = throughput(llm, args.num_seqs, args.new_tokens, args.rounds)
            rows.append((label, args.num_seqs, tps))
            print(f"{label}: {tps:.1f} tokens/s", file=sys.stderr)
        for label, kwargs in (
            ("TP=2, one sequence", {"tensor_parallel_size": 2}),
            ("PP=2, one sequence", {"pipeline_parallel_size": 2}),
        ):
            with LLM(str(path), **common, **kwargs) as llm:
                tps = throughput(llm, 1, args.new_tokens, args.rounds)
            rows.append((label, 1, tps))
            print(f"{label}: {tps:.1f} tokens/s", file=sys.stderr)
        flags = ["--device", "cpu", "--dtype", "float32", "-pp", "2", "--max-model-len", "512"]
        flags += ["--num-gpu-blocks-override", "256", "--max-num-seqs", str(args.serve_clients)]
        serving = []
        for label, extra in (
            ("mgpu serve -pp 2 --max-steps-in-flight 1", ["--max-steps-in-flight", "1"]),
            ("mgpu serve -pp 2 --max-steps-in-flight 2", ["--max-steps-in-flight", "2"]),
        ):
            tps = serve_throughput(
                path, flags + extra, args.serve_clients, args.new_tokens, args.serve_rounds
            )
            serving.append((label, args.serve_clients, tps))
            print(f"{label}: {tps:.1f} tokens/s", file=sys.stderr)
    speedup = rows[1][2] / rows[0][2]
    serve_speedup = serving[1][2] / serving[0][2]
    load_after = os.getloadavg()[0]
    load = f"1-minute load average {load_before:.1f} at the start, {load_after:.1f} at the end"
    start, end = markers("pipeline_overlap", "cpu")
    lines = [
        start,
        "## Pipeline parallelism: steps in flight (CPU)",
        "",
        f"Machine: {machine_line('cpu')}; {load} (other jobs shared the cores).",
        "",
        "Command: `python benchmarks/pipeline_overlap.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`",
        "",
        "| configuration | concurrent sequences | generated tokens/s |",
        "|---|---|---|",
        *[f"| {label} | {n} | {tps:.1f} |" for label, n, tps in rows],
        *[f"| {label}, streaming clients | {n} | {tps:.1f} |" for label, n, tps in serving],
        "",
        f"Steps in flight against one at a time: {speedup:.2f}x; bubble fraction "
        f"1 - speedup / 2 = {1 - speedup / 2:.0%} (0% is a perfect two-stage pipeline). "
        "Model: random Llama, hidden 768, 8 layers, float32 (~57M parameters). With PP=2 each "
        "stage is pinned to its own core. Where no core is left beyond the ranks (2 cores, 2 "
        "stages) the engine process's scheduling, broadcasts and detokenising take turns with a "
        "stage, and two micro-batches in flight halve each step's batch, so the per-step "
        "overhead doubles: there steps in flight cost throughput, and the engine's default on "
        "CPU is one step at a time unless the machine has more cores than ranks "
        "(`LLMEngine`, `max_steps_in_flight`).",
        "",
        f"Serving, {args.serve_clients} streaming clients x {args.serve_rounds} requests of "
        f"{args.new_tokens} tokens (benchmarks/serve_throughput.py's client): steps in flight "
        f"against one at a time {serve_speedup:.2f}x. At PP=1 the engine always submits step "
        "N+1 before it detokenises step N (there is no switch to compare against).",
        end,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text, "pipeline_overlap", "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
