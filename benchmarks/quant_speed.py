"""Decode speed and memory of quantized weights on CPU: fp32, bf16, int8, int4 and GGUF files.

Question: what do int8/int4 weights (``--quantization``) and GGUF block types buy at batch-1
decode, where every weight is read once per token, and which kernel should each form use?

Two parts, in one run:

1. Kernels: one ``(1, K) x (K, N)`` decode matmul per weight form and path (dense, PyTorch's fused
   int8/int4 kernels, the dequantise-block-by-block path), best of many calls.
2. Engines: single-stream decode tokens/s and worker resident memory of mgpu on a random Llama
   (default hidden 1024, 8 layers, vocab 32000) at each precision, the GGUF files written the way
   llama.cpp's converter lays them out (``tests/quant/gguf_files.py``). When ``llama_cpp``
   (llama-cpp-python) is importable, llama.cpp decodes the same GGUF files with the same thread
   count beside it; otherwise its rows say so.

Run: ``python benchmarks/quant_speed.py`` (``--no-write`` to print only; writes the
``quant_speed`` section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
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
    """One engine configuration."""

    label: str
    model: Path
    dtype: str
    quantization: str | None = None


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
        num_key_value_heads=hidden // 256,
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


def mgpu_rate(case: Case, new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, worker RSS MB) of one case: (time of 1 + n tokens) - (time of 1)."""
    with LLM(
        str(case.model),
        device="cpu",
        dtype=case.dtype,
        num_blocks=64,
        max_model_len=512,
        cpu_reserved_cores=0,
        quantization=case.quantization,
    ) as llm:

        def run(n: int) -> float:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            t = time.perf_counter()
            llm.generate([{"prompt_token_ids": list(range(10, 26))}], params, use_tqdm=False)
            return time.perf_counter() - t

        run(4)
        one = min(run(1) for _ in range(3))
        full = min(run(1 + new_tokens) for _ in range(3))
        rss = llm.engine.live_rank_reports()[0].resident_bytes / 2**20
    return new_tokens / (full - one), rss


def llama_cpp_rate(model: Path, threads: int, new_tokens: int) -> float | None:
    """llama.cpp decode tokens/s of a GGUF file, or None when llama_cpp is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(model), n_threads=threads, n_ctx=512, verbose=False)
    prompt = list(range(10, 26))

    def run(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0)):
            if i + 1 >= n:
                break
        return time.perf_counter() - t

    run(4)
    one = min(run(1) for _ in range(3))
    full = min(run(1 + new_tokens) for _ in range(3))
    return new_tokens / (full - one)


def main() -> None:
    """Measure kernels and engines, print and write the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kernel-size", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    start, end = markers("quant_speed", "cpu")
    lines = [start, "## Quantized weights: decode speed and memory (CPU)", ""]
    lines += [f"Machine: {machine_line('cpu')}; {threads} threads.", ""]
    size = args.kernel_size
    lines += [f"### One decode matmul, ({size} x {size}) weight, batch 1", ""]
    lines += ["| weight | path | ms |", "|---|---|---|"]
    for form, path, ms in kernel_rows(size, size):
        lines.append(f"| {form} | {path} | {ms:.3f} |")
    from gguf import GGMLQuantizationType as T
    from tests.quant.gguf_files import write_gguf

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_model(Path(tmp) / "hf", args.hidden, args.layers)
        cases = [
            Case("fp32", hf, "float32"),
            Case("bf16", hf, "bfloat16"),
            Case("int8 (bf16 activations)", hf, "bfloat16", "int8"),
            Case("int4 g128 (bf16 activations)", hf, "bfloat16", "int4"),
        ]
        ggufs = {"Q8_0": (T.Q8_0, None), "Q4_0": (T.Q4_0, None)}
        ggufs["Q4_K_M"] = (T.Q4_K, {"v_proj": T.Q6_K, "down_proj": T.Q6_K, "lm_head": T.Q6_K})
        for name, (qtype, overrides) in ggufs.items():
            path = Path(tmp) / f"{name}.gguf"
            write_gguf(hf, path, qtype, overrides)
            cases.append(Case(f"GGUF {name}", path, "bfloat16"))
        title = f"random Llama hidden {args.hidden}, {args.layers} layers, vocab 32000"
        lines += ["", f"### Single-stream decode, {title}", ""]
        lines += [
            "| weights | engine | tokens/s | vs fp32 | worker RSS (MB) |",
            "|---|---|---|---|---|",
        ]
        base = None
        for case in cases:
            rate, rss = mgpu_rate(case, args.new_tokens)
            base = base or rate
            lines.append(f"| {case.label} | mgpu | {rate:.1f} | {rate / base:.2f}x | {rss:.0f} |")
            print(lines[-1], flush=True)
            if case.model.suffix == ".gguf":
                peer = llama_cpp_rate(case.model, threads, args.new_tokens)
                text = "not installed" if peer is None else f"{peer:.1f}"
                ratio = "-" if peer is None else f"mgpu/llama.cpp {rate / peer:.2f}x"
                lines.append(f"| {case.label} | llama.cpp | {text} | {ratio} | - |")
    lines += ["", end]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(section, "quant_speed", "cpu")


if __name__ == "__main__":
    main()
