"""Regenerate docs/guide.md from the planner's real output.

    python scripts/gen_guide.py           # rewrite docs/guide.md
    python scripts/gen_guide.py --check   # exit 1 if docs/guide.md is out of date

Every example in the guide is a ``mgpu plan`` command run here through the planner's own CLI, and
every comparison table is built from ``plan()``; the prose around them is in this file.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
from importlib.metadata import version
from pathlib import Path

from rich.console import Console

from mgpu.planner.cli import add_plan_arguments, run_plan
from mgpu.planner.plan import Plan, plan

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide.md"
WIDTH = 100


def run(command: str) -> str:
    """A ``mgpu plan`` command and its output, as a fenced block.

    Args:
        command: the flags after ``mgpu plan``.
    """
    out = io.StringIO()
    # A fixed width and no colour, whatever the terminal or CI environment says.
    console = Console(file=out, width=WIDTH, force_terminal=False, color_system=None)
    parser = argparse.ArgumentParser(prog="mgpu plan")
    add_plan_arguments(parser)
    run_plan(parser.parse_args(shlex.split(command)), console)
    text = "\n".join(line.rstrip() for line in out.getvalue().splitlines())
    return f"```console\n$ mgpu plan {command}\n{text}\n```"


def _tok(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _row(label: str, p: Plan, price: str = "") -> str:
    used = [d for d in p.devices if d.used]
    fits = f"yes, {p.margin_gb:.1f} GiB spare" if p.fits else f"no, {-p.margin_gb:.1f} GiB short"
    d = p.decode_tokens_per_s
    return (
        f"| {label} | {fits} | {p.strategy.replace('_', ' ')} on {len(used)} | "
        f"{_tok(d.expected)} ({_tok(d.low)}-{_tok(d.high)}) | "
        f"{_tok(p.prefill_tokens_per_s.expected)} | {p.psu_watts or 'n/a'} W | {price} |"
    )


def one_versus_two() -> str:
    """Llama 3.3 70B at int4 on one large card or two smaller ones."""
    header = (
        "| GPUs | fits at 4K context | layout | decode tok/s (range) | prefill tok/s | PSU "
        "| launch price of the GPUs |\n|---|---|---|---:|---:|---:|---:|"
    )
    rows = []
    for gpus, price in (
        ("1x RTX A6000", "$4,649"),
        ("1x A100 PCIe 80GB", "no citable price"),
        ("2x RTX 3090", "$2,998"),
        ("2x RTX 4090", "$3,198"),
        ("2x RTX 5090", "$3,998"),
    ):
        result = plan("Llama-3.3-70B", gpus, quantization="int4", context=4096)
        rows.append(_row(gpus, result, price))
    return "\n".join([header, *rows])


def links() -> str:
    """Tensor parallelism over PCIe versus NVLink."""
    header = "| GPUs | link | decode tok/s | TP scaling efficiency |\n|---|---|---:|---:|"
    rows = []
    for gpus, model, quant, link in (
        ("2x RTX 3090", "Llama-3.3-70B", "int4", "pcie4"),
        ("2x RTX 3090", "Llama-3.3-70B", "int4", "nvlink"),
        ("4x A100 80GB PCIe", "Llama-3.3-70B", "bf16", "pcie4"),
        ("4x A100 80GB SXM", "Llama-3.3-70B", "bf16", "nvlink"),
        ("8x A100 80GB PCIe", "Llama-3.3-70B", "bf16", "pcie4"),
        ("8x A100 80GB SXM", "Llama-3.3-70B", "bf16", "nvlink"),
    ):
        result = plan(model, gpus, quantization=quant, parallelism="tp", interconnect=link)
        efficiency = result.tp_scaling_efficiency
        rows.append(
            f"| {gpus}, {model} {quant} | {link} | {_tok(result.decode_tokens_per_s.expected)} | "
            f"{'n/a' if efficiency is None else f'{efficiency:.0%}'} |"
        )
    return "\n".join([header, *rows])


def engines() -> str:
    """The same two GPUs under different engines and layouts."""
    header = (
        "| engine | precision | layout | decode tok/s | prefill tok/s |\n|---|---|---|---:|---:|"
    )
    rows = []
    for engine, quant, parallelism in (
        ("llama.cpp", "q4_k_m", "layer-split"),
        ("llama.cpp", "q4_k_m", "tp"),
        ("exllamav2", "exl2-4.65", "auto"),
        ("vllm", "awq-int4", "tp"),
        ("vllm", "awq-int4", "pp"),
        ("mgpu", "awq-int4", "tp"),
    ):
        result = plan(
            "Llama-3.3-70B", "2x RTX 4090", quantization=quant, engine=engine,
            parallelism=parallelism, context=4096,
        )  # fmt: skip
        rows.append(
            f"| {engine} | {quant} | {result.strategy.replace('_', ' ')} | "
            f"{_tok(result.decode_tokens_per_s.expected)} | "
            f"{_tok(result.prefill_tokens_per_s.expected)} |"
        )
    return "\n".join([header, *rows])


def serve_commands() -> str:
    """The commands of the 2x RTX 4090 plan."""
    result = plan("Llama-3.3-70B", "2x RTX 4090", quantization="q4_k_m", context=4096)
    blocks = []
    for name, command in result.commands.items():
        blocks.append(f"{name}:\n\n```bash\n{command}\n```")
    per_gpu = ", ".join(f"GPU {d.index}: {d.required_gb:.1f} GiB" for d in result.devices if d.used)
    text = "\n\n".join(blocks) + f"\n\nThe plan expects {per_gpu} in use once the server is up."
    if result.commands["mgpu"].startswith("#"):
        text += (
            " The mgpu line is a comment, not a command: the plan prints an `mgpu serve` command "
            "only for what the engine accepts (its registered architectures and its "
            "`--quantization` choices), so a Q4_K_M plan runs under vLLM or llama.cpp until the "
            "engine loads GGUF files. A 16-bit plan, such as `mgpu plan --model Llama-3.1-8B "
            "--gpus 2x4090`, prints one."
        )
    return text


def stamp() -> str:
    """The guide's first line: who writes it, and the rich version its tables were drawn with."""
    return (
        f"<!-- Generated by scripts/gen_guide.py (rich {version('rich')}); edit the script, "
        "not this file. -->"
    )


def render_guide() -> str:
    """The whole guide."""
    sections = [
        stamp() + "\n",
        """# From "does my model fit?" to a monitored multi-GPU server

This guide follows one question from start to finish: *I want to run a large model on the GPUs I
have (or will buy). Does it fit, how should it be split, how fast will it be, and how do I run and
watch it?* Every output and number below is produced by the planner itself
(`scripts/gen_guide.py` regenerates this file, and a test fails when it is out of date). The
formulas and their validation against published measurements are in [planner.md](planner.md).

## 1. Does it fit one GPU?

Llama 3.3 70B is the model most people try first on consumer cards. At Q4_K_M (4.84 bits per
weight) its weights alone are about 40 GiB:
""",
        run('--model Llama-3.3-70B --quantization q4_k_m --gpus "1x RTX 4090"'),
        """
It does not fit, and the plan says what would. Exit status 3 means "does not fit", so scripts can
branch on it. The plan counts the weights as mgpu's engine holds them once loaded: a Q4_K_M file's
blocks become int4 groups of 32 and int8 rows, about 5.5 bits per weight, where llama.cpp runs
the file's 4.84 as stored.

## 2. Two 24 GB cards

The name can be written the way Ollama writes it. A tag without a quantization means what
`ollama pull` would fetch, Ollama's default file for that model (recorded with its source in the
catalogue), and the plan names the tag it resolves to:
""",
        run("--model llama3.3:70b --gpus 2x4090"),
        """
With mgpu's engine that file misses two 24 GB cards by a little, and the plan names the format
that fits: int4 quantized from the Hugging Face checkpoint while loading (4.25 bits per weight):
""",
        run("--model Llama-3.3-70B --quantization int4 --gpus 2x4090"),
        """
Read it top to bottom: each GPU holds half of every layer (tensor parallel), most of its 24 GiB;
the KV cache for 4,096 tokens is small next to the weights; tensor parallelism over PCIe
costs some speed in all-reduces but still beats splitting the layers, where the two GPUs take
turns. `--plot memory.png` draws the same breakdown as a picture, and `--json` gives it to scripts
(the contract is in planner.md).

## 3. Which engine, which split

The same two cards run at different speeds under different engines, and llama.cpp's layer split
adds memory, not speed, for a single user:
""",
        engines(),
        """
Engines without published measurements of their own (mgpu's engine among them) borrow the
constants of the measured engines for the same weight format; their plans say so.

## 4. One large card or two smaller ones?

Same model at int4, same context, different hardware:
""",
        one_versus_two(),
        """
One 48 GB card holds the model with room to spare but reads it at 768 GB/s; two GeForce cards
read their halves in parallel at 936-1,792 GB/s each and finish sooner, at the cost of more power,
more heat, and a split to manage. The buyer's view, with cloud prices (each cited in
`src/mgpu/planner/data/cloud_prices.json`):
""",
        run("--model Llama-3.3-70B --quantization int4 --recommend --budget 5000"),
        """
## 5. PCIe or NVLink?

Tensor parallelism does two all-reduces per layer for every token. Over PCIe each costs tens of
microseconds; over NVLink a few. With more GPUs the share grows:
""",
        links(),
        """
For one user on two GPUs the difference is small; at eight GPUs, NVLink keeps tensor parallelism
worth doing.

## 6. The 405B model

Llama 3.1 405B at 4 bits is more than 200 GiB of weights:
""",
        run("--model Llama-3.1-405B --quantization int4 --gpus 8xH100-SXM"),
        """
On consumer cards the answer is mostly a count:
""",
        consumer_405b(),
        """
## 7. More users, longer context

The KV cache grows with context x concurrent sequences. Sixteen users at 8K tokens no longer fit
beside the weights on two 24 GB cards:
""",
        run(
            "--model Llama-3.3-70B --quantization q4_k_m --gpus 2x4090 --context 8192 "
            "--concurrency 16 --kv-cache-dtype fp8"
        ),
        """
## 8. Start the server

Take the command from the plan. For the two-RTX-4090 plan of section 2:
""",
        serve_commands(),
        """
Check it from another terminal:

```bash
curl -s http://127.0.0.1:8000/health
curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{"model": "<served model name>", "messages": [{"role": "user", "content": "Hello"}]}'
```

## 9. Watch it

* GPU memory and load against the plan, every five seconds:

  ```bash
  nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu,power.draw \\
    --format=csv -l 5
  ```

  Memory in use should match the plan's per-GPU total within about a GiB (the runtime overhead is
  an estimate); power draw under load should stay below the TDPs the PSU was sized for.
* The server's Prometheus endpoint, `http://127.0.0.1:8000/metrics`, reports the engine's health,
  running and waiting requests, KV-cache usage (`mgpu_kv_cache_usage_perc`), pre-emptions, token
  counters and latency histograms. A KV-cache usage near 1 with rising pre-emptions means the
  concurrency or context is more than the plan allowed for: lower `--max-num-seqs`, or plan again
  with the real `--concurrency`.
* Tokens per second from `mgpu_generation_tokens_total` should fall inside the plan's low-high
  range; far below it points at the machine (a card in an x4 slot, thermal throttling, another
  process on the GPU).

## 10. Fine-tune it

The planner sizes LoRA training too, with the speed-up from more GPUs:
""",
        run("--model Llama-3.1-8B --gpus 2x4090 --train lora --dataset-tokens 20000000"),
        """
Epoch times rest on an assumed utilisation (no LoRA measurement is in the data), so treat them as a
range, unlike the inference speeds, which are validated against published measurements.
""",
    ]
    return "\n".join(sections).rstrip() + "\n"


def consumer_405b() -> str:
    """What 405B at Q4_K_M needs in 24 GB cards, from the plan's own fields."""
    command = '--model Llama-3.1-405B --quantization q4_k_m --gpus "2x RTX 4090" --json'
    result = plan("Llama-3.1-405B", "2x RTX 4090", quantization="q4_k_m")
    return (
        f'`mgpu plan {command}` answers `"fits": {str(result.fits).lower()}` '
        f"({-result.margin_gb:.0f} GiB short per GPU) and "
        f'`"minimum_fit": "{result.minimum_fit}"`: a machine few people build, which is why '
        "405B is usually rented."
    )


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/guide.md, or check that it is up to date.

    Args:
        argv: command-line arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Fail if the guide is out of date.")
    args = parser.parse_args(argv)
    text = render_guide()
    if args.check:
        if GUIDE.read_text() != text:
            print(f"{GUIDE} is out of date: run scripts/gen_guide.py", file=sys.stderr)
            return 1
        return 0
    GUIDE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
