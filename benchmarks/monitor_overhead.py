"""Does the monitor slow decoding? TP=2 on CPU, with and without background sampling, one run.

Question: the server samples every rank's device and reads every rank's step timings in the
background (:class:`mgpu.monitor.watch.EngineMonitor`). Does that cost decode speed? The peer is
the same engine with the monitor stopped: rounds alternate off and on (sampling ten times faster
than the server's default, 0.1 s) so drift on a loaded machine hits both alike, and the median of
each is reported.

Run: ``python benchmarks/monitor_overhead.py [--rounds 5] [--tokens 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mgpu import LLM, SamplingParams
from mgpu.monitor.telemetry import DeviceSampler
from mgpu.monitor.watch import EngineMonitor, MonitorConfig


def _round(llm: LLM, tokens: int, batch: int) -> float:
    """Decode ``batch`` sequences of ``tokens`` tokens; returns generated tokens per second."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([f"prompt {i}" for i in range(batch)], params, use_tqdm=False)
    return batch * tokens / (time.perf_counter() - start)


def main() -> None:
    """Alternate rounds without and with the monitor; print both medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    llm = LLM(tensor_parallel_size=2, device="cpu")
    executor = llm.engine.executor
    pids = {rank: p.pid for rank, p in zip(executor.local.ranks, executor.procs, strict=True)}
    config = MonitorConfig(telemetry_interval_s=args.interval)
    off, on, updates, update_ms = [], [], 0, 0.0
    try:
        _round(llm, args.tokens, args.batch)  # warm-up
        for _ in range(args.rounds):
            off.append(_round(llm, args.tokens, args.batch))
            sampler = DeviceSampler("cpu", pids, args.interval)
            monitor = EngineMonitor(config, executor.rank_timings, sampler, tp_size=2)
            monitor.start()
            start = time.monotonic()
            on.append(_round(llm, args.tokens, args.batch))
            monitor.stop()
            updates += int((time.monotonic() - start) / args.interval)
        start = time.perf_counter()
        for _ in range(50):
            monitor.update()
        update_ms = (time.perf_counter() - start) / 50 * 1e3
    finally:
        llm.shutdown()
    a, b = statistics.median(off), statistics.median(on)
    print(
        f"rounds {args.rounds}, {args.batch} x {args.tokens} tokens, sampling every "
        f"{args.interval} s (~{updates} samples while on)"
    )
    print(f"monitor off: median {a:.1f} tok/s  (runs {', '.join(f'{x:.1f}' for x in off)})")
    print(f"monitor on:  median {b:.1f} tok/s  (runs {', '.join(f'{x:.1f}' for x in on)})")
    print(f"difference: {100 * (b - a) / a:+.1f}%")
    print(f"one monitor update (sample 2 workers, read 2 ranks' timings): {update_ms:.2f} ms")


if __name__ == "__main__":
    main()
