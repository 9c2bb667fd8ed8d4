"""Does the monitor slow decoding? TP=2 on CPU: background sampling, and the per-step gather of
every rank's timings, each with and without, one run.

Question 1: the server samples every rank's device and turns every rank's step timings into rates
in the background (:class:`mgpu.monitor.watch.EngineMonitor`). Does that cost decode speed? The
peer is the same engine with the monitor stopped: rounds alternate off and on (sampling ten times
faster than the server's default, 0.1 s) so drift on a loaded machine hits both alike, and the
median of each is reported.

Question 2: after a step every rank starts an asynchronous gloo gather of its timings onto the
output rank (:class:`mgpu.monitor.timing.TimingExchange`), which the engine always runs (on one
step every 0.1 s). What does it cost? Here it runs after every step, the worst case. The peer is
the same two gloo ranks (``init_distributed``, TP=2) running steps shaped like the demo model's
decode (matmuls and two all-reduces of a (4, 512) activation per layer, 4 layers, through shared
memory as the engine's CPU ranks do) without the exchange: rounds alternate, medians of steps per
second, and the host time of one exchange on the output rank.

Run: ``python benchmarks/monitor_overhead.py [--rounds 5] [--tokens 64] [--steps 400] [--pin]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgpu import LLM, SamplingParams
from mgpu.distributed import parallel_state as ps
from mgpu.distributed.communication import gather_step_timings, tp_all_reduce
from mgpu.distributed.shm import make_buffers
from mgpu.monitor.telemetry import DeviceSampler
from mgpu.monitor.timing import TIMER, TimingExchange
from mgpu.monitor.watch import EngineMonitor, MonitorConfig


def _round(llm: LLM, tokens: int, batch: int) -> float:
    """Decode ``batch`` sequences of ``tokens`` tokens; returns generated tokens per second."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([f"prompt {i}" for i in range(batch)], params, use_tqdm=False)
    return batch * tokens / (time.perf_counter() - start)


def _exchange_rank(
    rank: int,
    port: int,
    rounds: int,
    steps: int,
    shm: tuple[torch.Tensor, torch.Tensor],
    pin: bool,
    out: dict,
) -> None:
    """One of two gloo ranks: alternate rounds of decode-shaped steps without and with the
    per-step timing gather; rank 0 records steps per second of each round in ``out``."""
    torch.set_num_threads(1)
    if pin:  # one core per rank, as the engine pins its CPU workers
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, [cores[rank % len(cores)]])
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    ps.init_distributed("gloo", rank, 2, 2, store, tp_shm_buffers=shm)  # as the engine on CPU
    w1, w2 = torch.randn(512, 704), torch.randn(704, 512)  # one rank's shard of a 512-wide MLP
    x = torch.randn(4, 512)  # (batch, hidden)
    exchange = TimingExchange(TIMER, 2, rank == ps.output_rank(), gather_step_timings)
    rates: dict[str, list[float]] = {"off": [], "on": [], "call_us": []}
    spent = 0.0
    for _ in range(rounds):
        for mode in ("off", "on"):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                TIMER.begin_step()
                for _ in range(4):  # layers
                    h = tp_all_reduce(x @ w1[:, :512] * 0.01)  # (4, 512): attention's o_proj
                    h = tp_all_reduce(torch.relu(h @ w1) @ w2 * 0.01)  # (4, 512): down_proj
                TIMER.end_step()
                if mode == "on":
                    t = time.perf_counter()
                    exchange.after_step()
                    spent += time.perf_counter() - t
            rates[mode].append(steps / (time.perf_counter() - start))
    exchange.finish()
    rates["call_us"] = [1e6 * spent / (rounds * steps)]
    dist.barrier()
    if rank == 0:
        out.update(rates)
    ps.destroy_distributed()


def _exchange_cost(rounds: int, steps: int, pin: bool = False) -> dict[str, list[float]]:
    """Steps per second of two gloo ranks without and with the timing gather, per round."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    shm = make_buffers(2, 4 * 512 * 4)  # one (4, 512) float32 activation per rank
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_exchange_rank, args=(port, rounds, steps, shm, pin, out), nprocs=2)
        return dict(out)


def main() -> None:
    """Alternate rounds without and with the monitor, then without and with the timing gather;
    print the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=400, help="steps per gather round")
    parser.add_argument("--pin", action="store_true", help="pin each gather rank to one core")
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
    print(f"one monitor update (sample 2 workers, 2 ranks' timings): {update_ms:.2f} ms")
    rates = _exchange_cost(args.rounds, args.steps, args.pin)
    a, b = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"timing gather, {args.rounds} rounds of {args.steps} decode-shaped TP=2 steps:")
    for name, median in (("off", a), ("on", b)):
        runs = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"gather {name + ':':4} median {median:.0f} steps/s  (runs {runs})")
    print(f"difference: {100 * (b - a) / a:+.1f}%, {1e6 * (1 / b - 1 / a):+.0f} us per step")
    print(f"host time of one exchange on the output rank: {rates['call_us'][0]:.0f} us")


if __name__ == "__main__":
    main()
