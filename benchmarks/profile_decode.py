"""Where the time of one decode step goes, on one CPU rank, for the demo model and a ~140M Llama.

Question: what stands between a decode step and the memory-bandwidth limit? The script builds the
rank's :class:`~mgpu.engine.model_runner.ModelRunner` in this process (a world of one), prefills a
batch, then times decode steps three ways: the whole ``execute`` call, its parts (building the
step's input tensors and attention metadata, the model's forward, the LM head, the sampler), and
``torch.profiler``'s per-operator totals. The engine-side cost of a step (scheduler, control plane,
detokenising) is the gap between ``LLM.generate``'s time per token and ``execute``'s.

Run: ``python benchmarks/profile_decode.py [--batch 1 32] [--steps 20]``; prints the tables.
``--settings [NAME ...]`` instead compares single-stream decode of the demo model and the ~140M
Llama under the default settings and the alternatives of :data:`SETTINGS` (cores kept for the
engine, OpenMP's wait policy, ``compile``), engines timed in turns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from decode_speed import make_big_model
from mgpu import LLM, SamplingParams
from mgpu.config import CacheConfig, ModelConfig, ParallelConfig
from mgpu.distributed import parallel_state as ps
from mgpu.engine.executor import cpu_shares
from mgpu.engine.messages import SeqChunk, StepInput
from mgpu.engine.model_runner import ModelRunner
from mgpu.models.loader import demo_model_path

PROMPT_LEN = 64


def _ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_runner(path: Path, batch: int, steps: int) -> None:
    """Print the step breakdown and the top operators of decode steps at ``batch`` sequences."""
    config = ModelConfig.from_file(path)
    runner = ModelRunner(
        path, config, ParallelConfig(), torch.device("cpu"), torch.float32, 0, CacheConfig()
    )
    blocks_per_seq = (PROMPT_LEN + steps * 4 + 16) // 16 + 1
    runner.allocate_kv_cache(batch * blocks_per_seq)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    prompt = [(7 * i) % (config.vocab_size - 2) + 2 for i in range(PROMPT_LEN)]
    prefill = StepInput(
        [SeqChunk(i, prompt, 0, tables[i], True) for i in range(batch)],
        new_seqs={i: SamplingParams(temperature=0.0) for i in range(batch)},
    )
    runner.execute(prefill)
    pos = [PROMPT_LEN]

    def step() -> StepInput:
        chunks = [SeqChunk(i, [5], pos[0], tables[i], True) for i in range(batch)]
        pos[0] += 1
        return StepInput(chunks)

    total = _ms(lambda: runner.execute(step()), steps)
    meta = _ms(lambda: runner._metadata(step().chunks), steps)
    ids, positions, attn = runner._metadata(step().chunks)
    with torch.inference_mode():
        forward = _ms(lambda: runner.model(ids, positions, attn, None, None), steps)
        hidden, _ = runner.model(ids, positions, attn, None, None)
        head = _ms(lambda: runner.model.compute_logits(hidden), steps)
        logits = runner.model.compute_logits(hidden)
        sample = _ms(lambda: runner.sampler(list(range(batch)), logits), steps)
    params = sum(p.numel() for p in runner.model.parameters())
    print(f"\n{path.name}: {params / 1e6:.1f}M parameters, batch {batch}, position ~{pos[0]}")
    print(f"  execute (one decode step)  {total:8.2f} ms")
    print(f"    step tensors + metadata  {meta:8.2f} ms")
    print(f"    model forward (layers)   {forward:8.2f} ms")
    print(f"    LM head                  {head:8.2f} ms")
    print(f"    sampler                  {sample:8.2f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.execute(step())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print("\n".join("    " + line for line in table.splitlines()))


def engine_rate(path: Path, tokens: int = 64) -> float:
    """Single-stream decode tokens/s through ``LLM`` (engine + worker process), defaults."""
    with LLM(str(path), device="cpu", dtype="float32", max_model_len=512) as llm:
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        prompt = {"prompt_token_ids": list(range(2, 2 + PROMPT_LEN))}
        llm.generate([prompt], params, use_tqdm=False)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return tokens / (time.perf_counter() - start)


#: The settings ``--settings`` compares: what a user gets, and what it could be instead; each is
#: ``LLM`` keyword arguments and the environment its workers start with. On a machine whose
#: workers share the engine's cores the defaults already wait passively (``OMP_WAIT_POLICY``
#: given here wins, see ``engine.worker.launch``); ``cpu_reserved_cores=1`` is the default
#: before 2026-12-02 on 2 cores; ``MGPU_CPU_ONEDNN=0`` is ``F.linear`` (MKL) for every product, as
#: until oneDNN took CPU products over on 2026-12-02 (``layers.matmul``);
#: ``MGPU_CPU_KERNELS=0`` is decode attention through the gather path (``cpu_kernels``);
#: ``async_scheduling=False`` runs one step at a time (no step looked ahead, ``engine.scheduler``).
SETTINGS: dict[str, tuple[dict, dict[str, str]]] = {
    "defaults": ({}, {}),
    "async_scheduling=False": ({"async_scheduling": False}, {}),
    "OMP_WAIT_POLICY=ACTIVE": ({}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    "cpu_reserved_cores=1": ({"cpu_reserved_cores": 1}, {}),
    "cpu_reserved_cores=1, PASSIVE": ({"cpu_reserved_cores": 1}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "cpu_reserved_cores=0": ({"cpu_reserved_cores": 0}, {}),
    "compile=True": ({"compile_decode": True}, {}),
    "MGPU_CPU_ONEDNN=0": ({}, {"MGPU_CPU_ONEDNN": "0"}),
    "MGPU_CPU_KERNELS=0": ({}, {"MGPU_CPU_KERNELS": "0"}),
}


def settings_rates(
    path: Path, names: list[str], rounds: int = 4, tokens: int = 64, dtype: str = "float32"
) -> None:
    """Print single-stream tokens/s of ``LLM(...)`` under each of :data:`SETTINGS` in ``names``,
    the engines alive at once and timed in turns (best of ``rounds``), with each one's start-up
    time. A setting's environment reaches only its workers (they read it when they start)."""
    llms, started = {}, {}
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(2, 2 + PROMPT_LEN))}
    try:
        for name in names:
            kwargs, env = SETTINGS[name]
            with mock.patch.dict(os.environ, env):  # read by its workers as they start
                begin = time.perf_counter()
                llm = LLM(str(path), device="cpu", dtype=dtype, max_model_len=512, **kwargs)
            llms[name] = llm
            llm.generate([prompt], params, use_tqdm=False)  # warm-up (and compilation)
            started[name] = time.perf_counter() - begin
        best = dict.fromkeys(llms, 0.0)
        for _ in range(rounds):
            for name, llm in llms.items():
                begin = time.perf_counter()
                llm.generate([prompt], params, use_tqdm=False)
                best[name] = max(best[name], tokens / (time.perf_counter() - begin))
    finally:
        for llm in llms.values():
            llm.shutdown()
    print(f"\n{path.name} ({dtype}): single stream through LLM(...), engines timed in turns")
    for name in llms:
        print(f"  {name:34s} {best[name]:7.1f} tokens/s  start-up + warm-up {started[name]:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-big", action="store_true", help="only the demo model")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: what a TP=1 worker gets)"
    )
    parser.add_argument(
        "--settings",
        nargs="*",
        choices=list(SETTINGS),
        help="only compare these LLM(...) settings (no names: all of them)",
    )
    parser.add_argument("--dtype", default="float32", help="dtype of the --settings engines")
    parser.add_argument("--rounds", type=int, default=4, help="turns of the --settings engines")
    args = parser.parse_args()
    if args.settings is not None:
        names = args.settings or list(SETTINGS)
        with tempfile.TemporaryDirectory() as tmp:
            settings_rates(demo_model_path(), names, args.rounds, dtype=args.dtype)
            if not args.skip_big:
                big = make_big_model(Path(tmp) / "llama-140m")
                settings_rates(big, names, args.rounds, dtype=args.dtype)
        return
    threads = args.threads or len(cpu_shares(1)[0])
    torch.set_num_threads(threads)
    print(f"{threads} torch thread(s), {os.cpu_count()} cores")
    ps.init_distributed("gloo", 0, 1, 1, dist.HashStore())  # a world of one rank
    with tempfile.TemporaryDirectory() as tmp:
        paths = [demo_model_path()]
        if not args.skip_big:
            paths.append(make_big_model(Path(tmp) / "llama-140m"))
        for path in paths:
            for batch in args.batch:
                profile_runner(path, batch, args.steps)
            rate = engine_rate(path)
            print(
                f"\n{path.name}: LLM.generate single stream {rate:.1f} tokens/s "
                f"= {1000 / rate:.2f} ms per token (engine + worker)"
            )


if __name__ == "__main__":
    main()
