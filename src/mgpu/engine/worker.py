"""The worker process: one per rank, its own interpreter running ``python -m mgpu.engine.worker``.

The launcher writes one pickled :class:`WorkerInit` to the worker's stdin and closes it; the worker
never imports the caller's program, so a script without a main guard, ``python -c``, stdin and
notebooks all work. The worker then:

1. connects to the engine's rendezvous store and joins the control group
   (:mod:`mgpu.distributed.control`) and the model's process groups;
2. builds its :class:`~mgpu.engine.model_runner.ModelRunner` and replies with its report;
3. serves control messages ``("call", step_id, method, args, reply_all, gather_timings)`` in
   order: it calls ``ModelRunner.method(*args)`` and replies ``(step_id, result, timings)`` when
   ``reply_all`` is true or, for ``execute``, when it is the output rank. ``("shutdown",)`` ends
   it.

Step timings travel with the replies: after an ``execute`` whose message says ``gather_timings``
every rank hands its seconds since the last such step to a
:class:`~mgpu.monitor.timing.TimingExchange`, which gathers them onto the output rank, and the
output rank's reply carries every rank's totals when they have changed (``timings``, else None).

Liveness: a thread bumps ``heartbeat/<rank>`` in the store every :data:`HEARTBEAT_S` and ends the
process when the store says ``shutdown`` or can no longer be reached. An exception is written to
``error/<rank>`` in the store (the engine watches it) and the worker exits with status 1. The store
carries nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from mgpu.config import CacheConfig, ModelConfig, ParallelConfig
from mgpu.distributed.shm import ShmFiles
from mgpu.memory import rank_weights

#: Seconds between two heartbeats of a worker.
HEARTBEAT_S = 0.25
#: Store key counting worker errors (each also writes ``error/<rank>``).
ERRORS_KEY = "errors"
#: Store key that tells every worker to exit.
SHUTDOWN_KEY = "shutdown"


@dataclass
class WorkerInit:
    """Everything a worker needs to start, written once to its stdin.

    Args:
        rank: global rank.
        model_path: the model directory.
        model_config: the architecture.
        parallel_config: the layout.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL).
        dtype_name: dtype of weights and activations.
        store_host: address of the engine's rendezvous store.
        store_port: its port.
        cpu_ids: cores this rank is pinned to (CPU only).
        parent_pid: the launching process, which this worker never outlives.
        spawned_by_main_thread: whether the launcher's main thread started this worker.
        cache_config: KV-cache settings.
        compile_decode: compile decode steps with ``torch.compile``.
        tp_shm: shared buffers of this rank's TP group, when its ranks share a CPU host.
        control_threads: gloo threads of the control group (see ``ControlPlane``).
        timeout_s: how long a collective or a control transfer may wait for a peer.
        omp_passive: start with ``OMP_WAIT_POLICY=PASSIVE`` and a bounded spin
            (:func:`shared_core_spincount`) unless the caller's environment sets either (CPU
            workers sharing the engine process's cores, see ``cpu_shares``).
    """

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
    tp_shm: ShmFiles | None = None
    control_threads: int = 2
    timeout_s: float = 300.0
    quantization: str | None = None
    omp_passive: bool = False


#: libgomp's spins before a waiting thread sleeps, for workers sharing the engine's cores: the
#: short spin of a rank holding few parameters, the long one from :data:`LONG_SPIN_MIN_PARAMS`
#: (see :func:`shared_core_spincount`).
SHARED_CORE_SPINCOUNT = 3000
SHARED_CORE_SPINCOUNT_LONG = 30000
#: Matrix parameters per rank from which its workers spin the long count.
LONG_SPIN_MIN_PARAMS = 32_000_000


def shared_core_spincount(model_config: ModelConfig, parallel_config: ParallelConfig) -> int:
    """libgomp's spin count for workers of this layout sharing the engine's cores.

    A rank's products take longer the more parameters it holds, and so do the gaps between its
    two threads reaching a product's end; a thread that stops spinning first sleeps, and waking
    it costs more than the spin. A small model's steps are short and its engine's host work is a
    large part of each token, which a long spin takes cores from. Measured on a 2-core EPYC
    (2026-12-04, ``GOMP_SPINCOUNT`` 3000 against 30000, runs alternated): the 140M Llama in
    fp16 through ``mgpu serve`` 62.8-66.5 against 50.3-64.2 tokens/s single stream, 182-200
    against 164-167 at 8 clients, even at 32; the 4.2M demo model 198-243 against 225-356
    single stream and 1774-1875 against 1963-2039 at 32 clients.
    """
    tp, pp = parallel_config.tensor_parallel_size, parallel_config.pipeline_parallel_size
    params = rank_weights(model_config, tp).matrix_elements // pp
    return SHARED_CORE_SPINCOUNT_LONG if params >= LONG_SPIN_MIN_PARAMS else SHARED_CORE_SPINCOUNT


def launch(init: WorkerInit) -> subprocess.Popen:
    """Start one worker interpreter for ``init``.

    Args:
        init: the worker's settings (pickled to its stdin).
    """
    env = dict(os.environ)
    # The worker must import this same mgpu, wherever the caller found it.
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    if init.omp_passive and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & env.keys():
        # Read by OpenMP when torch loads, so set before the start. Passive, but spinning a
        # moment first: the next operator of a step comes within microseconds, the next step
        # after the engine's host work. On 2 shared cores (2026-12-02, a Sapphire Rapids Xeon,
        # 140M Llama fp32) 3000 spins gave 49-54 tokens/s single stream against 32-37 passive
        # and 18 spinning, and 5-12% more at 32 clients; the demo model 375 against 228-248.
        # On a 2-core EPYC (2026-12-04) larger models gained from a longer spin and the demo
        # model lost (:func:`shared_core_spincount`).
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env["GOMP_SPINCOUNT"] = str(shared_core_spincount(init.model_config, init.parallel_config))
    # -P (Python 3.11+): the caller's working directory is not put first on the import path.
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    proc = subprocess.Popen(
        [sys.executable, *safe_path, "-m", "mgpu.engine.worker"], stdin=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(pickle.dumps(init))
        proc.stdin.close()
    return proc


def _die_with_parent(parent_pid: int, spawned_by_main_thread: bool) -> None:
    """Make sure this worker never outlives its launcher, however the launcher ends.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that started the worker exits, so it is armed only
    for workers started by the main thread; the parent-pid watch covers the others within a second.
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


def _heartbeat(host: str, port: int, rank: int) -> None:
    """Bump this rank's heartbeat; exit when the engine says so or its store is gone."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10))
        while True:
            store.add(f"heartbeat/{rank}", 1)
            if store.check([SHUTDOWN_KEY]):
                os._exit(0)
            time.sleep(HEARTBEAT_S)
    except Exception:  # the store (the engine) is unreachable: nobody will send work again
        os._exit(1)


def run(init: WorkerInit) -> None:
    """Body of a worker process; never returns."""
    _die_with_parent(init.parent_pid, init.spawned_by_main_thread)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    import torch.distributed as dist

    store = dist.TCPStore(
        init.store_host, init.store_port, is_master=False, timeout=timedelta(seconds=60)
    )
    threading.Thread(
        target=_heartbeat,
        args=(init.store_host, init.store_port, init.rank),
        daemon=True,
        name="heartbeat",
    ).start()
    try:
        _serve(init, store)
    except BaseException as exc:  # report everything, including SystemExit from a bad call
        with contextlib.suppress(Exception):
            store.set(f"error/{init.rank}", pickle.dumps((_picklable(exc), traceback.format_exc())))
            store.add(ERRORS_KEY, 1)
        os._exit(1)
    os._exit(0)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(init: WorkerInit, store: Any) -> None:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore; a worker that is killed leaks it and the
    # parent's resource tracker then warns at exit. A thread lock is all a worker needs.
    tqdm.set_lock(threading.RLock())

    from mgpu.config import parse_dtype
    from mgpu.distributed.communication import gather_step_timings
    from mgpu.distributed.control import ControlPlane
    from mgpu.distributed.parallel_state import destroy_distributed, init_distributed
    from mgpu.engine.model_runner import ModelRunner
    from mgpu.monitor.timing import TIMER, TimingExchange

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
    control = ControlPlane(store, init.rank + 1, world + 1, init.timeout_s, init.control_threads)
    init_distributed(
        backend,
        init.rank,
        world,
        init.parallel_config.tensor_parallel_size,
        dist.PrefixStore("model", store),
        timeout_s=init.timeout_s,
        tp_shm_buffers=init.tp_shm.open() if init.tp_shm is not None else None,
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
    exchange = TimingExchange(TIMER, world, runner.is_output_rank, gather_step_timings)
    control.reply((-1, runner.report(), None))
    try:
        while True:
            message = control.next_message()
            if message[0] == "shutdown":
                exchange.finish()
                return
            _, step_id, method, args, reply_all, gather_timings = message
            result = getattr(runner, method)(*args)
            # Every rank runs every step in the same order, with the same flag: the gathers pair.
            timings = exchange.after_step(gather_timings) if method == "execute" else None
            if reply_all or (method == "execute" and runner.is_output_rank):
                control.reply((step_id, result, timings))
    finally:
        runner.finish_sends()
        destroy_distributed()


def main() -> None:
    """``python -m mgpu.engine.worker``: read the :class:`WorkerInit` from stdin and serve."""
    init = pickle.load(sys.stdin.buffer)
    run(init)


if __name__ == "__main__":
    main()
