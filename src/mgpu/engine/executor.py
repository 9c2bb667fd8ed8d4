"""Spawns the worker processes and talks to them: one small message per step, replies from one rank.

A worker that dies (killed, out of memory, crashed) is noticed within one wait: every wait watches
the process sentinels as well as the pipes. The engine then stops every worker and raises
:class:`WorkerError`, so callers get an error instead of a hang, and no process is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing

from mgpu.config import CacheConfig, ModelConfig, ParallelConfig
from mgpu.distributed.shm import make_buffers, shm_collectives_supported
from mgpu.engine.worker import WorkerInit, worker_main
from mgpu.errors import MgpuError, WorkerError

logger = logging.getLogger("mgpu.executor")


def cpu_shares(world_size: int, reserved: int | None = None) -> list[list[int]]:
    """Split the cores this process may use into one share per rank (round-robin if too few).

    Args:
        world_size: number of ranks.
        reserved: cores left to the engine process (tokenizer, scheduler, HTTP server). By default
            one when there are more cores than ranks: a worker's OpenMP threads wait for each other
            at every operator, so one thread descheduled by the engine process stalls them all
            (measured on 2 cores: small matrix products 4-28x slower while the server ran).
    """
    cores = sorted(os.sched_getaffinity(0))
    if reserved is None:
        reserved = 1 if len(cores) > world_size else 0
    if len(cores) - reserved >= world_size:
        cores = cores[reserved:]
        per = len(cores) // world_size
        return [cores[i * per : (i + 1) * per] for i in range(world_size)]
    return [[cores[i % len(cores)]] for i in range(world_size)]


class Executor:
    """Owns the workers of one engine.

    Args:
        model_path: the model directory.
        model_config: the architecture.
        parallel_config: the layout (one worker per rank).
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, one GPU per rank).
        dtype_name: dtype of weights and activations.
        cache_config: KV-cache settings the workers size and lay out their caches by.
        cpu_reserved_cores: on CPU, cores kept free for this process (see :func:`cpu_shares`).
        compile_decode: compile the workers' decode steps with ``torch.compile``.
        tp_collective_bytes: on CPU, the largest TP collective that goes through shared memory
            (:mod:`mgpu.distributed.shm`); 0 keeps every collective on gloo.
        quantization: ``--quantization`` of the weights (None: as stored).
    """

    def __init__(
        self,
        model_path: Path,
        model_config: ModelConfig,
        parallel_config: ParallelConfig,
        device_type: str,
        dtype_name: str,
        cache_config: CacheConfig,
        cpu_reserved_cores: int | None = None,
        compile_decode: bool = False,
        tp_collective_bytes: int = 0,
        quantization: str | None = None,
    ):
        self.parallel_config = parallel_config
        world = parallel_config.world_size
        tp = parallel_config.tensor_parallel_size
        self.output_rank = (parallel_config.pipeline_parallel_size - 1) * tp
        # The engine hosts the rendezvous store on a port the OS picks: two engines never collide.
        self._store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        shares = cpu_shares(world, cpu_reserved_cores) if device_type == "cpu" else [None] * world
        # One set of shared buffers per TP group (the ranks of one pipeline stage), created here so
        # the workers inherit them at spawn; the engine process keeps them alive.
        self._tp_buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * (world // tp)
        if device_type == "cpu" and tp > 1 and tp_collective_bytes and shm_collectives_supported():
            self._tp_buffers = [make_buffers(tp, tp_collective_bytes) for _ in range(world // tp)]
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self._closed = False
        for rank in range(world):
            parent, child = ctx.Pipe(duplex=True)
            init = WorkerInit(
                rank=rank,
                model_path=model_path,
                model_config=model_config,
                parallel_config=parallel_config,
                device_type=device_type,
                dtype_name=dtype_name,
                store_host="127.0.0.1",
                store_port=self._store.port,
                cpu_ids=shares[rank],
                parent_pid=os.getpid(),
                spawned_by_main_thread=threading.current_thread() is threading.main_thread(),
                cache_config=cache_config,
                compile_decode=compile_decode,
                tp_shm_buffers=self._tp_buffers[rank // tp],
                quantization=quantization,
            )
            proc = ctx.Process(
                target=worker_main, args=(init, child), name=f"mgpu-rank{rank}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        # Runs at garbage collection or interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _kill_all, list(self.procs))
        self.reports = self._collect(range(world))

    @property
    def is_alive(self) -> bool:
        """Whether every worker is running."""
        return not self._closed and all(p.is_alive() for p in self.procs)

    def _collect(self, ranks: range | list[int]) -> list[Any]:
        """Wait for one reply from each of ``ranks``, failing fast on any death or error."""
        pending = {self.conns[r]: r for r in ranks}
        results: dict[int, Any] = {}
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while pending:
            ready = wait(list(self.conns) + list(sentinels))
            for obj in ready:
                if obj in sentinels:
                    rank = sentinels[obj]
                    # A dying worker may have sent its error first: report that, it says more.
                    if self.conns[rank].poll():
                        self._receive(rank)
                    self.procs[rank].join(timeout=1)
                    code = self.procs[rank].exitcode
                    self._fail(
                        f"worker rank {rank} (pid {self.procs[rank].pid}) died with exit "
                        f"code {code}"
                    )
                rank = self.conns.index(obj)  # type: ignore[arg-type]
                value = self._receive(rank)
                if obj in pending:
                    results[rank] = value
                    del pending[obj]
        return [results[r] for r in ranks]

    def _receive(self, rank: int) -> Any:
        try:
            status, *payload = self.conns[rank].recv()
        except (EOFError, OSError):
            self._fail_dead(rank)
        if status == "ok":
            return payload[0]
        exc, text = payload
        logger.debug("worker rank %d failed:\n%s", rank, text)
        if isinstance(exc, MgpuError):
            self.shutdown()
            raise exc
        self._fail(f"worker rank {rank} failed: {type(exc).__name__}: {exc}")
        return None

    def _fail_dead(self, rank: int) -> None:
        proc = self.procs[rank]
        proc.join(timeout=2)
        how = f"exit code {proc.exitcode}"
        if proc.exitcode is not None and proc.exitcode < 0:
            how = f"signal {signal.Signals(-proc.exitcode).name}"
        self._fail(f"worker rank {rank} (pid {proc.pid}) died ({how})")

    def _fail(self, message: str) -> None:
        self.shutdown()
        raise WorkerError(message + "; the engine has stopped all its workers")

    def _send(self, ranks: range | list[int], method: str, args: tuple, reply: bool) -> None:
        if self._closed:
            raise WorkerError("the engine's workers have been shut down")
        for rank in ranks:
            try:
                self.conns[rank].send((method, args, reply))
            except (BrokenPipeError, OSError):
                self._fail(f"worker rank {rank} is not reachable")

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Call ``ModelRunner.method`` on every rank; returns the replies in rank order."""
        ranks = range(len(self.procs))
        self._send(ranks, method, args, reply=True)
        return self._collect(ranks)

    def execute(self, step: Any) -> Any:
        """Run one step on every rank; returns the output rank's sampled tokens."""
        self._send(range(len(self.procs)), "execute", (step,), reply=False)
        return self._collect([self.output_rank])[0]

    def shutdown(self) -> None:
        """Stop every worker: politely, then by force. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("shutdown", (), False))
        for proc in self.procs:
            proc.join(timeout=3)
        _kill_all(self.procs)
        for conn in self.conns:
            conn.close()
        self._finalizer.detach()


def _kill_all(procs: list[mp.process.BaseProcess]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=5)
