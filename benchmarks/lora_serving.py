"""Serving throughput with 0, 1 and 4 LoRA adapters in the batch, and the cost of the LoRA delta.

Question: what does serving adapters cost beside the base model? One engine per case runs the same
requests (one prompt, greedy, a fixed number of new tokens, all submitted at once so they share
batches): the base model without ``--enable-lora``; the base model with LoRA enabled (the hook,
no adapter); every request on one adapter; the requests spread round-robin over four adapters
(``--max-loras 4``, so all four share each step). Output tokens/s counts generated tokens over the
wall time of ``generate``.

A second table times one layer's delta alone: mgpu's masked formulation (two matmuls for every
adapter of the batch at once, no host sync) against grouping the tokens by adapter (a loop over
the batch's adapters with index_select / index_add, one host sync per adapter for the indices).

Adapters: random PEFT LoRA (r 16, every linear of the decoder layers), written by ``peft``.

Run: ``python benchmarks/lora_serving.py`` (writes docs/benchmarks.md's LoRA serving section).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import machine_line, markers, write_section
from mgpu import LLM, SamplingParams
from mgpu.models.loader import demo_model_path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: Path, root: Path, count: int, rank: int) -> list[Path]:
    """``count`` random PEFT adapters of rank ``rank`` over ``model``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


def throughput(
    model: Path,
    device: str,
    adapters: list[Path],
    use: int,
    requests: int,
    tokens: int,
    rank: int,
    repeats: int,
) -> float:
    """Best of ``repeats`` output tokens/s of ``requests`` greedy requests spread over the first
    ``use`` adapters."""
    lora = (
        {
            "enable_lora": True,
            "lora_modules": [f"a{i}={p}" for i, p in enumerate(adapters)],
            "max_loras": max(1, use),
            "max_lora_rank": rank,
        }
        if adapters
        else {}
    )
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = ["The quick brown fox jumps over the lazy dog"] * requests
    names = [f"a{i % use}" if use else None for i in range(requests)]
    with LLM(str(model), device=device, max_model_len=256, max_num_seqs=requests, **lora) as llm:
        llm.generate(prompts[:2], params, use_tqdm=False, lora_request=names[:2])  # warm-up
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False, lora_request=names)
            elapsed = time.perf_counter() - start
            best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    return best


def delta_times(device: str, tokens: int, width: int, rank: int, loras: int) -> tuple[float, float]:
    """Seconds per call of one (width -> width) layer's delta: masked vs grouped by adapter."""
    dev = torch.device(device)
    x = torch.randn(tokens, width, device=dev)  # (T, in)
    a_all = torch.randn(loras * rank, width, device=dev)  # (S * R, in)
    b_all = torch.randn(width, loras * rank, device=dev)  # (out, S * R)
    slots = torch.arange(tokens, device=dev) % loras  # (T,)
    table = torch.zeros(loras + 1, loras * rank, device=dev)
    for s in range(loras):
        table[s + 1, s * rank : (s + 1) * rank] = 1

    def masked() -> torch.Tensor:
        return ((x @ a_all.T) * table[slots + 1]) @ b_all.T  # (T, out)

    def grouped() -> torch.Tensor:
        out = torch.zeros(tokens, width, device=dev)
        for s in torch.unique(slots).tolist():  # one host sync for the set, one per adapter
            rows = (slots == s).nonzero().squeeze(1)
            a, b = a_all[s * rank : (s + 1) * rank], b_all[:, s * rank : (s + 1) * rank]
            out.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
        return out

    torch.testing.assert_close(masked(), grouped(), rtol=1e-3, atol=1e-2)
    return _time(masked, dev), _time(grouped, dev)


def _time(fn: object, device: torch.device, repeats: int = 50) -> float:
    for _ in range(5):
        fn()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=demo_model_path(), help="HF model directory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--requests", type=int, default=16, help="requests per case")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rank", type=int, default=16, help="adapters' LoRA rank")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (best is kept)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    cases = [("no LoRA (plain engine)", 0, 0), ("LoRA on, base model only", 4, 0)]
    cases += [("1 adapter", 4, 1), ("4 adapters, round-robin", 4, 4)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp), 4, args.rank)
        for name, loaded, use in cases:
            tps = throughput(
                args.model,
                args.device,
                adapters[:loaded],
                use,
                args.requests,
                args.tokens,
                args.rank,
                args.repeats,
            )
            rows.append((name, tps))
            print(f"{name}: {tps:.0f} tokens/s", flush=True)
    deltas = []
    for tokens in (16, 256):
        masked, grouped = delta_times(args.device, tokens, 1024, args.rank, 4)
        deltas.append((tokens, masked, grouped))
        print(f"delta T={tokens}: masked {masked * 1e6:.0f} us, grouped {grouped * 1e6:.0f} us")
    start, end = markers("lora_serving", args.device)
    base = rows[0][1]
    lines = [
        start,
        f"## LoRA serving throughput ({args.device.upper()}, 0, 1 and 4 adapters in the batch)",
        "",
        f"Machine: {machine_line(args.device)}.",
        "",
        f"Command: `python benchmarks/lora_serving.py --device {args.device} --requests "
        f"{args.requests} --tokens {args.tokens} --rank {args.rank} --repeats {args.repeats}` "
        f"({args.model.name}, concurrent greedy requests, adapters on every linear, best run)",
        "",
        "| case | output tokens/s | vs no LoRA |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {tps:.0f} | {tps / base:.2f}x |" for name, tps in rows]
    lines += [
        "",
        f"One layer's delta (1024 -> 1024, 4 adapters of rank {args.rank}, tokens spread evenly):",
        "",
        "| tokens | masked, two matmuls (mgpu) | grouped by adapter (loop + index_add) |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m * 1e6:.0f} us | {g * 1e6:.0f} us |" for t, m, g in deltas]
    lines += [
        "",
        "A step without adapter tokens skips the delta (it has no LoRA mapping); a step with them",
        "pays two small matmuls per linear. When first recorded the machine was",
        "shared and loaded (five jobs on two cores): there, differences between rows are within",
        "run-to-run noise; rerun on a quiet machine for numbers to compare.",
        end,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text, "lora_serving", args.device)


if __name__ == "__main__":
    main()
