"""The worker process: one per rank. It joins the process groups, loads its shard and serves calls.

Protocol over its pipe to the engine: the engine sends ``(method, args, reply)``; the worker calls
``ModelRunner.method(*args)`` and, when ``reply`` is true, sends back ``("ok", result)``. Any
exception
is sent as ``("error", exception, traceback text)`` and the worker exits, so the engine notices at
once.
Only the output rank replies to ``execute``: the other ranks stay silent unless they fail.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mgpu.config import CacheConfig, ModelConfig, ParallelConfig


@dataclass
class WorkerInit:
    """Everything a worker needs to start, sent once when it is spawned."""

    rank: int
    model_path: Path
    model_config: ModelConfig
    parallel_config: ParallelConfig
    device_type: str
    dtype_name: str
    store_host: str
    store_port: int
    cpu_ids: list[int] | None
    parent_pid: int
    spawned_by_main_thread: bool
    cache_config: CacheConfig
    compile_decode: bool = False
    tp_shm_buffers: tuple[Any, Any] | None = None
    quantization: str | None = None


def _die_with_parent(parent_pid: int, spawned_by_main_thread: bool) -> None:
    """Make sure this worker never outlives the engine process, however the engine ends.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that spawned the worker exits, so it is armed only
    for workers spawned by the main thread; the parent-pid watch covers the others within a second.
    """
    if sys.platform.startswith("linux") and spawned_by_main_thread:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch() -> None:  # portable fallback, and covers a parent that died before prctl ran
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def worker_main(init: WorkerInit, conn: Connection) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(init.parent_pid, init.spawned_by_main_thread)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    try:
        _serve(init, conn)
    except BaseException as exc:  # report everything, including SystemExit from a bad call
        with contextlib.suppress(OSError, EOFError):
            conn.send(("error", _picklable(exc), traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(init: WorkerInit, conn: Connection) -> None:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore; a worker that is killed leaks it and the
    # parent's resource tracker then warns at exit. A thread lock is all a worker needs.
    tqdm.set_lock(threading.RLock())

    from mgpu.config import parse_dtype
    from mgpu.distributed.parallel_state import destroy_distributed, init_distributed
    from mgpu.engine.model_runner import ModelRunner

    if init.cpu_ids:
        os.sched_setaffinity(0, init.cpu_ids)
        torch.set_num_threads(len(init.cpu_ids))
    if init.device_type == "cuda":
        torch.cuda.set_device(init.rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    world = init.parallel_config.world_size
    store = dist.TCPStore(init.store_host, init.store_port, world, is_master=False)
    init_distributed(
        backend,
        init.rank,
        world,
        init.parallel_config.tensor_parallel_size,
        store,
        tp_shm_buffers=init.tp_shm_buffers,
    )
    runner = ModelRunner(
        init.model_path,
        init.model_config,
        init.parallel_config,
        device,
        parse_dtype(init.dtype_name),
        init.rank,
        init.cache_config,
        init.compile_decode,
        init.quantization,
    )
    conn.send(("ok", runner.report()))
    try:
        while True:
            try:
                method, args, reply = conn.recv()
            except EOFError:
                return  # the engine is gone
            if method == "shutdown":
                return
            result = getattr(runner, method)(*args)
            if reply or (method == "execute" and runner.is_output_rank):
                conn.send(("ok", result))
    finally:
        destroy_distributed()
