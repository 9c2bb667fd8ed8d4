"""Drive one load level: a fixed number of clients in a closed loop, or Poisson arrivals.

With ``concurrency = C``, C clients each send a request, wait for its whole stream and send the
next, until the prompts run out (the load ``mgpu serve``'s benchmark and vLLM's
``--max-concurrency`` apply). With ``request_rate = R``, requests start at Poisson arrival times
(exponential gaps of mean 1/R seconds, seeded) whether or not earlier ones have finished, which is
how an open population of users loads a server; ``concurrency`` then caps how many are in flight.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from mgpu.bench.client import RequestResult, send
from mgpu.bench.workload import BenchRequest


@dataclass
class LevelRun:
    """The raw outcome of one level.

    Attributes:
        concurrency: clients (or the cap on requests in flight under a request rate).
        request_rate: requests per second of the Poisson arrivals; None for a closed loop.
        duration: seconds from the first request sent to the last one ended.
        results: one per request, in the order they were sent.
    """

    concurrency: int | None
    request_rate: float | None
    duration: float
    results: list[RequestResult] = field(default_factory=list)


def poisson_delays(count: int, rate: float, seed: int = 0) -> list[float]:
    """Start times (seconds after the first) of ``count`` Poisson arrivals at ``rate`` per second.

    Args:
        count: requests.
        rate: mean arrivals per second (``inf``: all at once).
        seed: seed of the exponential gaps.
    """
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    starts, now = [], 0.0
    for _ in range(count):
        starts.append(now)
        now += rng.expovariate(rate)
    return starts


async def run_level(
    url: str,
    model: str,
    requests: list[BenchRequest],
    *,
    concurrency: int | None = None,
    request_rate: float | None = None,
    endpoint: str = "completions",
    api_key: str | None = None,
    timeout: float = 600.0,
    seed: int = 0,
    progress: bool = True,
    label: str = "",
    extra_body: dict | None = None,
) -> LevelRun:
    """Send every request of ``requests`` under one load level.

    Args:
        url: the server's base URL.
        model: the ``model`` field of each request.
        requests: what to send, in order.
        concurrency: clients in a closed loop, or the cap on requests in flight under a rate.
        request_rate: Poisson arrivals per second instead of a closed loop.
        endpoint: ``completions`` or ``chat``.
        api_key: sent as ``Authorization: Bearer``.
        timeout: seconds one request may take before it counts as an error.
        seed: seed of the arrival times.
        progress: show a progress bar (on stderr).
        label: the progress bar's description.
        extra_body: fields added to every request's body.
    """
    if concurrency is None and request_rate is None:
        raise ValueError("give a concurrency, a request rate, or both")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    limit = concurrency or len(requests)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    results: list[RequestResult | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=label, unit="req", disable=not progress, leave=False)
    gate = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(index: int) -> None:
            async with gate:
                req = requests[index]
                results[index] = await send(client, url, req, model, endpoint, headers, extra_body)
            bar.update(1)

        begin = time.perf_counter()
        if request_rate is None:
            await asyncio.gather(*(one(i) for i in range(len(requests))))
        else:
            tasks = []
            for i, start in enumerate(poisson_delays(len(requests), request_rate, seed)):
                await asyncio.sleep(max(0.0, begin + start - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - begin
    bar.close()
    return LevelRun(concurrency, request_rate, duration, [r for r in results if r is not None])
