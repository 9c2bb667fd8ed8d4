"""Single-stream decode of a Mixtral-shaped MoE on CPU: experts sliced (TP=2) or whole (EP=2).

Question: with two ranks, is it faster to slice every expert over both (tensor parallel: each rank
runs all chosen experts at half width) or to place whole experts on each rank (expert parallel:
each rank runs only the chosen experts it holds, at full width)? Both hold half the expert bytes and
do one all-reduce per MoE layer; they differ in matmul shapes and in load balance (with top-2 of 8
experts, a token's two experts land on one rank or on both). mgpu at TP=1 and ``transformers``
``generate()`` on the same weights, dtype and thread count are the peers.

Model: a random Mixtral (hidden 512, 4 layers, 16 heads, 4 KV heads, 8 experts of width 1536,
top-2, vocab 32000, ~111M parameters, ~445 MB in float32) written to a temporary directory.

Run: ``python benchmarks/moe_decode.py`` (writes docs/benchmarks.md's MoE decode section).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine_line, markers, write_section
from decode_speed import TransformersRunner, interleaved_rates
from mgpu import LLM, SamplingParams
from mgpu.models.loader import demo_model_path

MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
}


def make_mixtral(path: Path) -> tuple[Path, int]:
    """Write the random Mixtral with the demo model's tokenizer; returns (path, parameter bytes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(MIXTRAL_CONFIG)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # spread the router logits so routing varies by token
            p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((demo_model_path() / name).read_bytes())
    return path, sum(p.numel() * 4 for p in model.parameters())


class MoeRunner:
    """An mgpu engine for one layout, kept alive and timed in turns with the others."""

    def __init__(self, path: Path, tp: int, expert_parallel: bool):
        self.llm = LLM(
            str(path),
            tensor_parallel_size=tp,
            enable_expert_parallel=expert_parallel,
            device="cpu",
            dtype="float32",
            num_blocks=64,
            max_model_len=512,
            cpu_reserved_cores=0,  # every core to the workers: the thread count transformers gets
        )
        self.run(8)  # warm-up

    def run(self, n: int) -> float:
        """Seconds to generate ``n`` tokens after the prompt."""
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": list(range(10, 26))}], params, use_tqdm=False)
        return time.perf_counter() - t

    def param_mb(self) -> list[float]:
        """Parameter megabytes of each rank."""
        return [r.param_bytes / 2**20 for r in self.llm.engine.rank_reports]

    def close(self) -> None:
        """Stop the workers."""
        self.llm.shutdown()


def main() -> None:
    """Measure the layouts and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, engines taking turns")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        path, total_bytes = make_mixtral(Path(tmp) / "mixtral")
        layouts = [("mgpu TP=1", 1, False), ("mgpu TP=2", 2, False), ("mgpu EP=2", 2, True)]
        engines = [MoeRunner(path, tp, ep) for _, tp, ep in layouts]
        peer = TransformersRunner(path, torch.float32, threads, "cpu")
        try:
            # transformers last in each round: its threads, in this process, spin on for a moment
            # after a run and would slow whichever engine followed it.
            *engine_rates, peer_rate = interleaved_rates(
                [*engines, peer], args.new_tokens, args.rounds
            )
            params = [engine.param_mb() for engine in engines]
        finally:
            for runner in [*engines, peer]:
                runner.close()
    start, end = markers("moe_decode", "cpu")
    command = " ".join(["python benchmarks/moe_decode.py", *sys.argv[1:]])
    lines = [
        start,
        "## MoE decode, experts sliced (TP) or whole (EP) (CPU)",
        "",
        f"Machine: {machine_line('cpu')}; {threads} threads.",
        "",
        f"Command: `{command}`",
        "",
        f"Random Mixtral, 8 experts top-2, {total_bytes / 2**20:.0f} MB of float32 parameters, "
        f"one sequence, {args.new_tokens} new tokens after a 16-token prompt, best of "
        f"{args.rounds} rounds.",
        "",
        "| engine | tokens/s | vs transformers | parameter MB per rank |",
        "|---|---|---|---|",
        f"| transformers | {peer_rate:.1f} | 1.00x | {total_bytes / 2**20:.0f} |",
    ]
    for (label, _, _), rate, mb in zip(layouts, engine_rates, params, strict=True):
        per_rank = ", ".join(f"{m:.0f}" for m in mb)
        lines.append(f"| {label} | {rate:.1f} | {rate / peer_rate:.2f}x | {per_rank} |")
    lines += [
        "",
        "On CPU the ranks split the same cores (TP=1: one worker with every thread; TP=2 and EP=2: "
        "two single-thread workers), so this compares layouts on one machine rather than scaling. "
        f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; on a "
        "shared, oversubscribed machine the multi-threaded TP=1 worker loses most (its threads "
        "wait for each other at every matmul: one MoE layer of this model measured 2 ms on one "
        "thread and 80 ms on two under such load), so rows are comparable within one table only.",
        end,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text, "moe_decode", "cpu")


if __name__ == "__main__":
    main()
