"""Single-stream decode speed of mgpu at TP=1 and TP=2 on CPU, beside transformers, in one run.

Question: how fast does one sequence decode, and how close is that to what the memory bandwidth of
this machine allows? Batch-1 decode reads every weight once per token, so
``limit = bandwidth / weight bytes per token`` bounds it; each result is reported as a fraction of
that limit and as an effective weight bandwidth (weight bytes x tokens/s).

Models: the bundled demo model, and a ~140M random Llama (hidden 1024, 12 layers, 16 heads, 4 KV
heads, intermediate 2048, vocab 32000, tied) written to a temporary directory. The peer is
``transformers`` ``generate()`` on the same weights, dtype and thread count.

Run: ``python benchmarks/decode_speed.py`` (writes docs/benchmarks.md's decode section). On CUDA,
mgpu's rows replay CUDA graphs of the decode steps (the default); ``--eager-rows`` adds TP=1 rows
with ``--enforce-eager`` beside them, graphs off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import machine_line, markers, write_section
from mgpu import LLM, SamplingParams
from mgpu.config import ModelConfig
from mgpu.memory import weight_bytes_per_rank
from mgpu.models.loader import demo_model_path

BIG_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "eos_token_id": 0,
}


@dataclass
class Result:
    """One measured configuration."""

    model: str
    engine: str
    dtype: str
    tp: int
    tokens_per_s: float
    weight_bytes: int
    rss_mb: list[float]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth_gbs(threads: int, device: str, size_mb: int = 512) -> float:
    """Read bandwidth of the device: best of several full reductions over a large tensor."""
    torch.set_num_threads(threads)
    x = torch.ones(size_mb * 2**20 // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(10):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def make_big_model(path: Path) -> Path:
    """Write the ~140M random Llama (weights ~N(0, 0.02)) with the demo model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(BIG_CONFIG)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((demo_model_path() / name).read_bytes())
    return path


def weight_bytes_read(path: Path, dtype: torch.dtype) -> int:
    """Bytes of weights read per decoded token (the whole model at this dtype)."""
    config = ModelConfig.from_file(path)
    bits = torch.finfo(dtype).bits
    return weight_bytes_per_rank(config, bits, vector_bytes=bits // 8)


def prompt_ids(n: int = 16) -> list[int]:
    return list(range(10, 10 + n))


class MgpuRunner:
    """An mgpu engine kept alive for one case, timed by :func:`interleaved_rates`."""

    def __init__(
        self,
        path: Path,
        dtype: str,
        tp: int,
        device: str,
        compile_decode: bool,
        enforce_eager: bool = False,
    ):
        self.llm = LLM(
            str(path),
            tensor_parallel_size=tp,
            device=device,
            dtype=dtype,
            num_blocks=64,
            max_model_len=512,
            cpu_reserved_cores=0,  # every core to the worker: the thread count transformers gets
            compile_decode=compile_decode,
            enforce_eager=enforce_eager,
        )
        self.run(8)  # warm-up (and compilation)

    def run(self, n: int) -> float:
        """Seconds to generate ``n`` tokens after the prompt."""
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": prompt_ids()}], params, use_tqdm=False)
        return time.perf_counter() - t

    def rss_mb(self) -> list[float]:
        """Resident memory of each rank now."""
        return [r.resident_bytes / 2**20 for r in self.llm.engine.live_rank_reports()]

    def close(self) -> None:
        """Stop the workers."""
        self.llm.shutdown()


class TransformersRunner:
    """transformers ``generate()`` (greedy, KV cache) on the same weights, in this process."""

    def __init__(self, path: Path, dtype: torch.dtype, threads: int, device: str):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.run(8)

    def run(self, n: int) -> float:
        """Seconds to generate ``n`` tokens after the prompt."""
        ids = torch.tensor([prompt_ids()], device=self.device)
        t = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        _sync(self.device)
        return time.perf_counter() - t

    def rss_mb(self) -> list[float]:
        """Not reported: transformers shares this process with the benchmark."""
        return []

    def close(self) -> None:
        """Release the model."""
        del self.model


def interleaved_rates(
    runners: list[MgpuRunner | TransformersRunner], new_tokens: int, rounds: int
) -> list[float]:
    """Decode tokens/s of each runner: (time for 1 + new_tokens) - (time for 1), best of
    ``rounds``. The runners take turns within each round, so a machine that speeds up or slows
    down over the minutes of a run (as shared VMs do) biases none of them."""
    best_one = [float("inf")] * len(runners)
    best_full = [float("inf")] * len(runners)
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            best_one[i] = min(best_one[i], runner.run(1))
            best_full[i] = min(best_full[i], runner.run(1 + new_tokens))
    return [new_tokens / (full - one) for one, full in zip(best_one, best_full, strict=True)]


def render(results: list[Result], bandwidth: float, command: str, device: str) -> str:
    """The markdown section: machine, command, table."""
    start, end = markers("decode_speed", device)
    title = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        start,
        f"## Single-stream decode ({title})",
        "",
        f"Machine: {machine_line(device)}; measured read bandwidth {bandwidth:.1f} GB/s.",
        "",
        f"Command: `{command}`",
        "",
        "| model | engine | dtype | TP | tokens/s | vs transformers | effective GB/s "
        "| of decode limit | RSS per rank (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    peers = {(r.model, r.dtype): r.tokens_per_s for r in results if r.engine == "transformers"}
    for r in results:
        gbs = r.weight_bytes * r.tokens_per_s / 1e9
        limit = bandwidth * 1e9 / r.weight_bytes
        ratio = r.tokens_per_s / peers[(r.model, r.dtype)]
        rss = ", ".join(f"{m:.0f}" for m in r.rss_mb) or "-"
        lines.append(
            f"| {r.model} | {r.engine} | {r.dtype} | {r.tp} | {r.tokens_per_s:.1f} | "
            f"{ratio:.2f}x | {gbs:.1f} | {r.tokens_per_s / limit:.0%} | {rss} |"
        )
    note = (
        "Effective GB/s = weight bytes read per token x tokens/s; decode limit = measured read "
        "bandwidth / weight bytes per token. `--compile` rows run decode steps through "
        "torch.compile."
    )
    if device == "cuda":
        note += (
            " mgpu rows replay CUDA graphs of the decode steps; `--enforce-eager` rows run them "
            "eagerly."
        )
    if device == "cpu":
        note += (
            " TP=2 on CPU splits the same cores over two worker processes, so it shows the cost "
            "of the all-reduces (shared memory between CPU ranks) rather than a speed-up."
        )
    lines += ["", note, end]
    return "\n".join(lines)


def main() -> None:
    """Measure every configuration and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--big-dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--rss-tp", default="4", help="extra TP sizes for resident memory only")
    parser.add_argument("--models", default="demo,llama-140m")
    parser.add_argument("--demo-dtype", default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true", help="add TP=1 rows with --compile")
    parser.add_argument(
        "--eager-rows",
        action="store_true",
        help="CUDA: add TP=1 rows with --enforce-eager (CUDA graphs off)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, engines taking turns")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--output", type=Path, help="also write the section to this file")
    args = parser.parse_args()
    device = args.device
    threads = len(os.sched_getaffinity(0))
    bandwidth = memory_bandwidth_gbs(threads, device)
    tps = [int(t) for t in args.tp.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        big = make_big_model(Path(tmp) / "llama-140m")
        cases = [("demo", demo_model_path(), args.demo_dtype)]
        cases += [("llama-140m", big, d) for d in args.big_dtypes.split(",")]
        cases = [c for c in cases if c[0] in args.models.split(",")]
        results: list[Result] = []
        for name, path, dtype in tqdm(cases, desc="benchmark", unit="case"):
            torch_dtype = getattr(torch, dtype)
            wbytes = weight_bytes_read(path, torch_dtype)
            # (engine label, TP, runner): transformers, mgpu at each TP, then at TP=1 mgpu --compile
            # and, on CUDA, mgpu --enforce-eager
            runners: list[tuple[str, int, MgpuRunner | TransformersRunner]] = [
                ("transformers", 1, TransformersRunner(path, torch_dtype, threads, device))
            ]
            runners += [("mgpu", tp, MgpuRunner(path, dtype, tp, device, False)) for tp in tps]
            if args.compile:
                runners.append(("mgpu --compile", 1, MgpuRunner(path, dtype, 1, device, True)))
            if args.eager_rows and device == "cuda":
                eager = MgpuRunner(path, dtype, 1, device, False, enforce_eager=True)
                runners.append(("mgpu --enforce-eager", 1, eager))
            try:
                rates = interleaved_rates([r for _, _, r in runners], args.new_tokens, args.rounds)
                for (engine, tp, runner), rate in zip(runners, rates, strict=True):
                    results.append(Result(name, engine, dtype, tp, rate, wbytes, runner.rss_mb()))
            finally:
                for _, _, runner in runners:
                    runner.close()
        for tp in [int(t) for t in args.rss_tp.split(",") if t]:
            runner = MgpuRunner(cases[0][1], "float32", tp, device, False)
            results.append(
                Result("demo", "mgpu (RSS only)", "float32", tp, 0.0, 1, runner.rss_mb())
            )
            runner.close()
    measured = [r for r in results if r.tokens_per_s > 0]
    command = " ".join(["python benchmarks/decode_speed.py", *sys.argv[1:]])
    text = render(measured, bandwidth, command, device)
    rss_rows = [r for r in results if r.tokens_per_s == 0]
    if rss_rows:
        extra = "\n".join(
            f"Resident memory per rank, demo model at TP={r.tp}: "
            + ", ".join(f"{m:.0f} MB" for m in r.rss_mb)
            for r in rss_rows
        )
        end = markers("decode_speed", device)[1]
        text = text.replace(end, extra + "\n" + end)
    print(text)
    print(json.dumps([r.__dict__ for r in results], indent=1))
    if args.output:
        args.output.write_text(text + "\n")
    if not args.no_write:
        write_section(text, "decode_speed", device)


if __name__ == "__main__":
    main()
