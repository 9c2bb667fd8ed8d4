"""Decode speed and memory of quantized weights on CPU: fp32, bf16, int8, int4 and GGUF files.

Question: what do int8/int4 weights (``--quantization``) and GGUF block types buy at batch-1
decode, where every weight is read once per token, and which kernel should each form use?

Three parts, in one run:

1. Kernels: one ``(1, K) x (K, N)`` decode matmul per weight form and path (dense, PyTorch's fused
   int8/int4 kernels, the dequantise-block-by-block path), best of many calls.
2. Engines: single-stream decode tokens/s, weight bytes and worker resident memory of mgpu on a
   random Llama (default hidden 1024, 8 layers, vocab 32000: 136M parameters) at fp32, bf16,
   int8 and int4 (each with bf16 and with fp32 activations) and on GGUF Q8_0, Q4_0 and Q4_K_M
   files written from the same weights the way llama.cpp's converter lays them out
   (``tests/quant/gguf_files.py``), with llama.cpp (llama-cpp-python) decoding the same GGUF
   files with the same thread count beside it, and the greedy tokens of both compared.
3. Activations: int8/int4 with bf16 against fp32 activations on the bundled demo model, the
   measurement behind the engine's default dtype for ``--quantization`` (docs/quantization.md).

Every configuration runs once per round and the rounds interleave the configurations (mgpu and
llama.cpp alike), so a load that comes and goes on the machine spreads over all of them; each
row keeps its best round.

llama.cpp runs in a subprocess of the interpreter given by ``--llama-python`` (default: this
one), so it can live in its own environment::

    python -m venv /opt/llamavenv && /opt/llamavenv/bin/pip install llama-cpp-python
    python benchmarks/quant_speed.py --llama-python /opt/llamavenv/bin/python

Run: ``python benchmarks/quant_speed.py`` (``--no-write`` to print only; writes the
``quant_speed`` section of docs/benchmarks.md). A short check of the script:
``--hidden 256 --layers 2 --new-tokens 8 --rounds 1 --kernel-size 512 --no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ROOT, machine_line, markers, write_section
from mgpu import LLM, SamplingParams
from mgpu.layers.quantization.weights import quantize_int4, quantize_int8
from mgpu.memory import LinearStorage, WeightFormat, predicted_weight_bytes

sys.path.insert(0, str(ROOT))  # the GGUF writer of the tests


def _best_ms(fn: Callable[[], object], calls: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def kernel_rows(n: int, k: int) -> list[tuple[str, str, float]]:
    """(form, path, ms) for one decode matmul of an (n, k) weight."""
    torch.manual_seed(0)
    w = torch.randn(n, k)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, k, dtype=dtype)
        name = str(dtype).removeprefix("torch.")
        wd = w.to(dtype)
        rows.append((f"dense {name}", "F.linear", _best_ms(lambda: F.linear(x, wd))))  # noqa: B023
        q8 = quantize_int8(w)
        for use_kernel in (True, False):
            path = "kernel" if use_kernel and dtype != torch.float32 else "dequantise"
            if use_kernel and dtype == torch.float32:
                ms = _best_ms(  # what the fp32 kernel would cost, for the record
                    lambda: torch.ops.aten._weight_int8pack_mm(x, q8.qweight, q8.scale)  # noqa: B023
                )
                path = "kernel (fp32 x)"
            else:
                ms = _best_ms(lambda: q8.matmul(x, use_kernel))  # noqa: B023
            rows.append((f"int8 {name}", path, ms))
        for use_kernel in (True, False):
            q4 = quantize_int4(w, 128)
            q4.finalize(use_kernel, dtype)
            if use_kernel and dtype == torch.float32:
                q4.finalize(True, torch.bfloat16)
                sz = q4.scale_zero.float()  # type: ignore[union-attr]
                ms = _best_ms(
                    lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.packed, 128, sz)  # noqa: B023
                )
                rows.append((f"int4 g128 {name}", "kernel (fp32 x)", ms))
                continue
            ms = _best_ms(lambda: q4.matmul(x, use_kernel))  # noqa: B023
            rows.append(
                (f"int4 g128 {name}", "kernel" if q4.layout != "nibbles" else "dequantise", ms)
            )
    return rows


@dataclass
class Case:
    """One engine configuration; ``engine`` is ``mgpu`` or ``llama.cpp`` (GGUF files only)."""

    label: str
    model: Path
    dtype: str
    quantization: str | None = None
    engine: str = "mgpu"


@dataclass
class Result:
    """Best decode rate over the rounds, with memory and the greedy tokens."""

    rate: float = 0.0
    weight_bytes: int | None = None
    linear_bytes: int | None = None  # the projections alone (embedding, LM head, norms stay float)
    rss_mb: float = 0.0
    tokens: list[int] | None = None


PROMPT = list(range(10, 26))


def make_model(path: Path, hidden: int, layers: int) -> Path:
    """A random Llama (weights ~N(0, 0.02)) with the demo model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mgpu.models.loader import demo_model_path

    config = AutoConfig.for_model(
        "llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        vocab_size=32000,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((demo_model_path() / name).read_bytes())
    return path


def mgpu_run(case: Case, new_tokens: int, reps: int) -> Result:
    """One round of a case: decode tokens/s = n / ((time of 1 + n tokens) - (time of 1))."""
    with LLM(
        str(case.model),
        device="cpu",
        dtype=case.dtype,
        num_blocks=64,
        max_model_len=512,
        cpu_reserved_cores=0,
        quantization=case.quantization,
    ) as llm:

        def run(n: int) -> tuple[float, list[int]]:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            t = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
            return time.perf_counter() - t, list(out[0].outputs[0].token_ids)

        run(2)
        one = min(run(1)[0] for _ in range(reps))
        full, tokens = min(run(1 + new_tokens) for _ in range(reps))
        report = llm.engine.live_rank_reports()[0]
        elem = torch.finfo(llm.engine.dtype).bits // 8
        floats = WeightFormat(LinearStorage("float", 0), elem)  # everything but the projections
        linear = report.param_bytes - predicted_weight_bytes(llm.engine.model_config, floats)
    rate = new_tokens / (full - one) if full > one else 0.0  # 0: a round the load spoiled
    return Result(rate, report.param_bytes, linear, report.resident_bytes / 2**20, tokens)


#: The llama.cpp side, run by ``--llama-python`` with (model, threads, new tokens, reps, prompt).
_LLAMA_CPP_SCRIPT = """
import json, resource, sys, time
from llama_cpp import Llama
path, threads, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = json.loads(sys.argv[5])
llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
def run(k):
    llm.reset()
    out, t = [], time.perf_counter()
    for tok in llm.generate(prompt, temp=0.0):
        out.append(tok)
        if len(out) >= k:
            break
    return time.perf_counter() - t, out
run(2)
one = min(run(1)[0] for _ in range(reps))
full, tokens = min(run(1 + n) for _ in range(reps))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rate = n / (full - one) if full > one else 0.0
print(json.dumps({"rate": rate, "rss_mb": rss, "tokens": tokens}))
"""


def llama_cpp_run(
    case: Case, python: str, threads: int, new_tokens: int, reps: int
) -> Result | str:
    """One round of llama.cpp on a GGUF file in a subprocess, or why it could not run."""
    args = [str(case.model), str(threads), str(new_tokens), str(reps), json.dumps(PROMPT)]
    proc = subprocess.run(
        [python, "-c", _LLAMA_CPP_SCRIPT, *args], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"did not run ({last[:80]})"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(out["rate"], None, None, out["rss_mb"], out["tokens"])


def measure(
    cases: list[Case], rounds: int, new_tokens: int, reps: int, python: str, threads: int
) -> dict[str, Result | str]:
    """Best result of each case over ``rounds`` interleaved rounds."""
    best: dict[str, Result | str] = {}
    for r in range(rounds):
        for case in cases:
            key = f"{case.label}|{case.engine}"
            if isinstance(best.get(key), str):
                continue  # llama.cpp could not run this file: do not retry every round
            if case.engine == "mgpu":
                got: Result | str = mgpu_run(case, new_tokens, reps)
            else:
                got = llama_cpp_run(case, python, threads, new_tokens, reps)
            old = best.get(key)
            if isinstance(got, str) or old is None or got.rate > old.rate:  # type: ignore[union-attr]
                best[key] = got
            shown = got if isinstance(got, str) else f"{got.rate:.1f} tok/s"
            print(f"round {r + 1}/{rounds}: {case.label} ({case.engine}): {shown}", flush=True)
    return best


def _agreement(a: list[int] | None, b: list[int] | None) -> str:
    """Leading greedy tokens two engines share, of those compared."""
    if not a or not b:
        return "-"
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return f"{same}/{n}"


def engine_table(
    cases: list[Case], best: dict[str, Result | str]
) -> tuple[list[str], dict[str, float]]:
    """Rows of the engine table and the ratios the targets are about."""
    lines = [
        "| weights | engine | tokens/s | vs fp32 | weights (MB) | vs fp32 | linears vs fp32 "
        "| RSS (MB) | same greedy tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = best[f"{cases[0].label}|mgpu"]
    assert isinstance(base, Result) and base.weight_bytes
    ratios: dict[str, float] = {}
    for case in cases:
        got = best[f"{case.label}|{case.engine}"]
        if isinstance(got, str):
            lines.append(f"| {case.label} | {case.engine} | {got} | - | - | - | - | - | - |")
            continue
        weights, weight_ratio, linear_ratio = "-", "-", "-"
        if got.weight_bytes and got.linear_bytes and base.linear_bytes:
            weights = f"{got.weight_bytes / 1e6:.1f}"
            weight_ratio = f"{got.weight_bytes / base.weight_bytes:.2f}x"
            linear_ratio = f"{got.linear_bytes / base.linear_bytes:.2f}x"
            ratios[f"weights {case.label}"] = got.weight_bytes / base.weight_bytes
            ratios[f"linear weights {case.label}"] = got.linear_bytes / base.linear_bytes
        agree = "-"
        if case.engine == "llama.cpp":
            mine = best.get(f"{case.label}|mgpu")
            if isinstance(mine, Result):
                agree = _agreement(mine.tokens, got.tokens)
                ratios[f"mgpu/llama.cpp {case.label}"] = mine.rate / got.rate
        lines.append(
            f"| {case.label} | {case.engine} | {got.rate:.1f} | {got.rate / base.rate:.2f}x | "
            f"{weights} | {weight_ratio} | {linear_ratio} | {got.rss_mb:.0f} | {agree} |"
        )
    return lines, ratios


def main() -> None:
    """Measure kernels and engines, print and write the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per config")
    parser.add_argument("--reps", type=int, default=3, help="timed generations per round")
    parser.add_argument("--kernel-size", type=int, default=2048)
    parser.add_argument(
        "--llama-python",
        default=sys.executable,
        help="interpreter with llama-cpp-python installed (pip install llama-cpp-python)",
    )
    parser.add_argument("--note", default="", help="a line for the section (machine state)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    start, end = markers("quant_speed", "cpu")
    lines = [start, "## Quantized weights: decode speed and memory (CPU)", ""]
    lines += [f"Machine: {machine_line('cpu')}; {threads} threads for mgpu and llama.cpp.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [
        f"Command: `python benchmarks/quant_speed.py --hidden {args.hidden} --layers "
        f"{args.layers} --new-tokens {args.new_tokens} --rounds {args.rounds} --reps "
        f"{args.reps} --kernel-size "
        f"{args.kernel_size} --llama-python PYTHON`; each row the best of the interleaved "
        "rounds.",
        "",
    ]
    size = args.kernel_size
    lines += [f"### One decode matmul, ({size} x {size}) weight, batch 1", ""]
    lines += ["| weight | path | ms |", "|---|---|---|"]
    for form, path, ms in kernel_rows(size, size):
        lines.append(f"| {form} | {path} | {ms:.3f} |")
    from gguf import GGMLQuantizationType as T
    from tests.quant.gguf_files import write_gguf

    from mgpu.models.loader import demo_model_path

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_model(Path(tmp) / "hf", args.hidden, args.layers)
        cases = [
            Case("fp32", hf, "float32"),
            Case("bf16", hf, "bfloat16"),
            Case("int8, bf16 activations", hf, "bfloat16", "int8"),
            Case("int8, fp32 activations", hf, "float32", "int8"),
            Case("int4 g128, bf16 activations", hf, "bfloat16", "int4"),
            Case("int4 g128, fp32 activations", hf, "float32", "int4"),
        ]
        ggufs = {"Q8_0": (T.Q8_0, None), "Q4_0": (T.Q4_0, None)}
        ggufs["Q4_K_M"] = (T.Q4_K, {"v_proj": T.Q6_K, "down_proj": T.Q6_K, "lm_head": T.Q6_K})
        for name, (qtype, overrides) in ggufs.items():
            path = Path(tmp) / f"{name}.gguf"
            write_gguf(hf, path, qtype, overrides)
            cases.append(Case(f"GGUF {name}", path, "bfloat16"))
            cases.append(Case(f"GGUF {name}", path, "bfloat16", engine="llama.cpp"))
        demo = demo_model_path()
        demo_cases = [
            Case(f"demo {q}, {a} activations", demo, d, q)
            for q in ("int8", "int4")
            for a, d in (("bf16", "bfloat16"), ("fp32", "float32"))
        ]
        best = measure(
            cases + demo_cases, args.rounds, args.new_tokens, args.reps, args.llama_python, threads
        )
        title = f"random Llama hidden {args.hidden}, {args.layers} layers, vocab 32000"
        lines += ["", f"### Single-stream decode, {title}", ""]
        table, ratios = engine_table(cases, best)
        lines += table
    lines += ["", "### int8/int4: bf16 against fp32 activations, demo model (4 layers, hidden 256)"]
    lines += ["", "| weights | tokens/s |", "|---|---|"]
    for case in demo_cases:
        got = best[f"{case.label}|mgpu"]
        lines.append(f"| {case.label} | {got.rate:.1f} |")  # type: ignore[union-attr]
    lines += ["", "Targets (ratios whatever they are):", ""]
    for name, value in ratios.items():
        if name.startswith(("weights int4", "linear weights int4", "mgpu/llama.cpp")):
            lines.append(f"- {name}: {value:.2f}x")
    lines += ["", end]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(section, "quant_speed", "cpu")


if __name__ == "__main__":
    main()
