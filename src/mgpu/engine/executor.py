"""Launches the ranks and drives them through the control plane: submit a step, collect its reply.

::

    Executor (engine process, control rank 0)
       │ submit(): one broadcast of ("call", step_id, method, args, reply_all, gather_timings)
       ▼
    rank 0 … rank N-1 (``python -m mgpu.engine.worker``, here or on other nodes)
       │ the output rank (or every rank, for ``call_all``) sends (step_id, result, timings)
       ▼
    receiver thread ──► replies queue ──► collect() (oldest step first)
                   └──► every rank's step timings (``rank_timings``, read by the monitor)

Several steps may be in flight: each worker serves messages in order and pipeline stages hand
hidden states on asynchronously, so with ``pp_size`` steps outstanding every stage is busy.

The output rank's step replies carry every rank's cumulative step timings (gathered onto it by
:class:`~mgpu.monitor.timing.TimingExchange` after the steps the executor marks, one every
:data:`TIMING_EVERY_S`), so the monitor's numbers cost no message of their own and cover ranks on
other nodes alike.

Liveness is watched in every wait: local workers by their process status, every rank by the
errors it writes to the rendezvous store and by its heartbeat there (ranks on other nodes). A dead
or failed rank makes the wait raise :class:`~mgpu.errors.WorkerError` (or the worker's own
:class:`~mgpu.errors.MgpuError`) within :data:`POLL_S` to a few tenths of a second; the survivors
are then stopped on a background thread, so the caller is never blocked by the clean-up.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import signal
import subprocess
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mgpu.config import CacheConfig, ModelConfig, ParallelConfig
from mgpu.distributed.control import ControlPlane
from mgpu.distributed.shm import ShmFiles, shm_collectives_supported
from mgpu.engine.worker import ERRORS_KEY, SHUTDOWN_KEY, WorkerInit, launch
from mgpu.errors import MgpuError, WorkerError
from mgpu.monitor.timing import RankTiming

logger = logging.getLogger("mgpu.executor")

#: Seconds between two liveness checks of local processes while waiting.
POLL_S = 0.02
#: Seconds between two checks of the store (errors, heartbeats).
STORE_POLL_S = 0.2
#: Seconds between two steps whose timings every rank gathers onto the output rank: ten times
#: the monitor's default sampling rate, at a fraction of a millisecond of host time each.
TIMING_EVERY_S = 0.1


#: A core is kept for the engine process only when every rank still gets this many: below that
#: the reservation costs more than the engine's host work does (see :func:`cpu_shares`).
MIN_CORES_PER_RANK_TO_RESERVE = 4


def cpu_shares(world_size: int, reserved: int | None = None) -> list[list[int]]:
    """Split the cores this process may use into one share per rank (round-robin if too few).

    Args:
        world_size: number of ranks.
        reserved: cores left to the engine process (tokenizer, scheduler, HTTP server). By default
            one when every rank keeps :data:`MIN_CORES_PER_RANK_TO_RESERVE` cores after it, else
            none: on 2 cores (a quiet machine, the ~140M Llama in fp32) giving the one worker
            both cores served 8 and 32 clients 19-20% faster than keeping one for the engine, at
            the same single-stream speed, once its OpenMP threads wait passively (workers that
            share cores with the engine get ``OMP_WAIT_POLICY=PASSIVE``, see
            :func:`~mgpu.engine.worker.launch`); with spinning waits the shared cores had made
            small products 4-28x slower while the server ran. docs/benchmarks.md has the runs.
    """
    cores = sorted(os.sched_getaffinity(0))
    if reserved is None:
        spare = len(cores) - 1 >= MIN_CORES_PER_RANK_TO_RESERVE * world_size
        reserved = 1 if spare else 0
    if len(cores) - reserved >= world_size:
        cores = cores[reserved:]
        per = len(cores) // world_size
        return [cores[i * per : (i + 1) * per] for i in range(world_size)]
    return [[cores[i % len(cores)]] for i in range(world_size)]


def node_ranks(world_size: int, nnodes: int, node_rank: int) -> list[int]:
    """Global ranks hosted by node ``node_rank``: contiguous, ``world_size / nnodes`` each.

    With TP innermost, a node holds whole TP groups whenever ``tp_size`` divides the ranks per node.
    """
    if nnodes < 1 or world_size % nnodes:
        raise MgpuError(f"{world_size} ranks cannot be split evenly over --nnodes {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise MgpuError(f"--node-rank must be in 0..{nnodes - 1}, got {node_rank}")
    per = world_size // nnodes
    return list(range(node_rank * per, (node_rank + 1) * per))


@dataclass(frozen=True)
class LaunchConfig:
    """What every rank needs besides the model and layout: device, dtype, rendezvous.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, one GPU per rank).
        dtype_name: dtype of weights and activations.
        cache_config: KV-cache settings.
        cpu_reserved_cores: on CPU, cores kept free for the engine process (see :func:`cpu_shares`).
        compile_decode: compile the workers' decode steps with ``torch.compile``.
        tp_collective_bytes: on CPU, the largest TP collective that goes through shared memory
            (:mod:`mgpu.distributed.shm`); 0 keeps every collective on gloo.
        nnodes: machines the ranks are spread over.
        master_addr: address of node 0, which hosts the rendezvous store.
        master_port: port of the store (0: one the OS picks; single node only).
        max_steps_in_flight: most steps outstanding at once (bounds the control group's threads).
        heartbeat_timeout_s: a rank whose heartbeat stalls this long is declared dead.
        timeout_s: how long a collective may wait for a peer.
        quantization: ``--quantization`` of the weights (None: as stored).
    """

    device_type: str
    dtype_name: str
    cache_config: CacheConfig
    cpu_reserved_cores: int | None = None
    compile_decode: bool = False
    tp_collective_bytes: int = 0
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    max_steps_in_flight: int = 1
    heartbeat_timeout_s: float = 5.0
    timeout_s: float = 300.0
    quantization: str | None = None


class WorkerSet:
    """The ranks of one node, started as their own interpreters.

    Args:
        model_path: the model directory.
        model_config: the architecture.
        parallel_config: the layout.
        launch_config: device, dtype and rendezvous.
        ranks: the global ranks to start here.
        store_port: the rendezvous store's port.
    """

    def __init__(
        self,
        model_path: Path,
        model_config: ModelConfig,
        parallel_config: ParallelConfig,
        launch_config: LaunchConfig,
        ranks: list[int],
        store_port: int,
    ):
        lc = launch_config
        tp = parallel_config.tensor_parallel_size
        shares = cpu_shares(len(ranks), lc.cpu_reserved_cores) if lc.device_type == "cpu" else None
        # Workers on the engine's own cores wait passively: a spinning OpenMP thread would hold
        # a core the engine process needs, and the thread it displaces stalls every operator.
        used = {core for share in shares or [] for core in share}
        shared = shares is not None and used >= set(os.sched_getaffinity(0))  # no core left free
        # One set of shared buffers per TP group held entirely by this node (CPU only).
        self.shm_files: dict[int, ShmFiles] = {}
        use_shm = lc.device_type == "cpu" and tp > 1 and lc.tp_collective_bytes
        if use_shm and shm_collectives_supported():
            for first in ranks[::tp]:
                if first % tp == 0 and first + tp - 1 in ranks:
                    self.shm_files[first // tp] = ShmFiles.create(tp, lc.tp_collective_bytes)
        self.ranks = ranks
        self.procs: list[subprocess.Popen] = []
        for i, rank in enumerate(ranks):
            init = WorkerInit(
                rank=rank,
                model_path=model_path,
                model_config=model_config,
                parallel_config=parallel_config,
                device_type=lc.device_type,
                dtype_name=lc.dtype_name,
                store_host=lc.master_addr,
                store_port=store_port,
                cpu_ids=shares[i] if shares else None,
                parent_pid=os.getpid(),
                spawned_by_main_thread=threading.current_thread() is threading.main_thread(),
                cache_config=lc.cache_config,
                compile_decode=lc.compile_decode,
                tp_shm=self.shm_files.get(rank // tp),
                control_threads=lc.max_steps_in_flight + 1,
                timeout_s=lc.timeout_s,
                quantization=lc.quantization,
                omp_passive=shared,
            )
            self.procs.append(launch(init))
        self._finalizer = weakref.finalize(self, _kill_all, list(self.procs), self.shm_files)

    def dead(self) -> tuple[int, subprocess.Popen] | None:
        """(global rank, process) of the first local worker that has exited, if any."""
        for rank, proc in zip(self.ranks, self.procs, strict=True):
            if proc.poll() is not None:
                return rank, proc
        return None

    def stop(self, grace_s: float = 3.0) -> None:
        """Wait up to ``grace_s`` for the workers to exit, then kill the rest; remove shm files."""
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        _kill_all(self.procs, self.shm_files)
        self._finalizer.detach()


def _kill_all(procs: list[subprocess.Popen], shm_files: dict[int, ShmFiles]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("worker pid %d did not exit after SIGKILL", proc.pid)
    for files in shm_files.values():
        files.unlink()


def describe_exit(code: int | None) -> str:
    """``exit code N`` or ``signal SIGKILL`` for a process's return code."""
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Executor:
    """Owns the ranks of one engine: starts them, sends them steps, collects replies.

    Args:
        model_path: the model directory.
        model_config: the architecture.
        parallel_config: the layout (one worker per rank).
        launch_config: device, dtype, KV-cache settings and rendezvous.

    Threading: ``submit``, ``collect`` and ``call_all`` are called by one thread at a time (the
    engine's, under its lock). The receiver thread only receives, and replaces the timings dict
    whole; ``_store_lock`` guards the store client, which the caller's thread and the clean-up
    thread share.
    """

    def __init__(
        self,
        model_path: Path,
        model_config: ModelConfig,
        parallel_config: ParallelConfig,
        launch_config: LaunchConfig,
    ):
        self.parallel_config = parallel_config
        self.launch_config = launch_config
        world = parallel_config.world_size
        self.world_size = world
        tp = parallel_config.tensor_parallel_size
        self.output_rank = (parallel_config.pipeline_parallel_size - 1) * tp
        lc = launch_config
        if lc.nnodes > 1 and not lc.master_port:
            raise MgpuError("--nnodes > 1 needs --master-port (the same on every node)")
        # Node 0 hosts the store; on one node the OS picks its port, so engines never collide.
        try:
            self._store = dist.TCPStore(
                lc.master_addr,
                lc.master_port,
                world + 1,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=lc.timeout_s),
            )
        except Exception as exc:
            raise MgpuError(
                f"cannot host the rendezvous store on {lc.master_addr}:{lc.master_port}: {exc}"
            ) from None
        self._store_lock = threading.Lock()
        self.local = WorkerSet(
            model_path,
            model_config,
            parallel_config,
            lc,
            node_ranks(world, lc.nnodes, 0),
            self._store.port,
        )
        self._closed = False
        self.error: str | None = None
        self._ids = itertools.count()
        self._expected: queue.Queue[tuple[int, list[int], bool] | None] = queue.Queue()
        self._replies: queue.Queue[tuple[int, Any] | BaseException] = queue.Queue()
        self._outstanding: deque[int] = deque()
        self._timings: dict[int, RankTiming] = {}
        self._last_timing_gather = 0.0
        self._heartbeats: dict[int, tuple[int, float]] = {}
        self._last_store_poll = 0.0
        # Heartbeats count only once every rank has loaded: imports hold the GIL for seconds.
        self._ready = False
        try:
            threads = lc.max_steps_in_flight + 1
            self.control = self._wait(
                lambda: ControlPlane(self._store, 0, world + 1, lc.timeout_s, threads)
            )
            self._receiver: threading.Thread = threading.Thread(
                target=self._receive_loop, daemon=True, name="mgpu-replies"
            )
            self._receiver.start()
            self._outstanding.append(-1)
            self._expected.put((-1, list(range(world)), True))
            self.reports = self._collect_id(-1)
            self._ready = True
        except BaseException:
            self.shutdown()
            raise

    # ---- liveness -----------------------------------------------------------------------------

    @property
    def procs(self) -> list[subprocess.Popen]:
        """This node's worker processes."""
        return self.local.procs

    @property
    def is_alive(self) -> bool:
        """Whether every rank is running: no failure seen, no local worker exited, and (checked
        at most every :data:`STORE_POLL_S`) no error or stalled heartbeat in the store.

        Callable from any thread (``/health``): the store client is behind ``_store_lock``, and
        a failure found here is recorded and stops the workers as it would in a wait.
        """
        if self._closed or self.error is not None or self.local.dead() is not None:
            return False
        if self._ready:
            try:
                self._check_store()
            except MgpuError:
                return False
        return True

    def _check(self) -> None:
        """Raise if any rank has died or failed (local status now, the store every so often)."""
        if self._closed:
            raise WorkerError(self.error or "the engine's workers have been shut down")
        dead = self.local.dead()
        if dead is not None:
            rank, proc = dead
            time.sleep(0.05)  # a failing worker writes its error before it exits: prefer it
            self._check_store(force=True)
            self._fail(f"worker rank {rank} (pid {proc.pid}) died ({describe_exit(proc.poll())})")
        self._check_store()

    def _check_store(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_store_poll < STORE_POLL_S:
            return
        self._last_store_poll = now
        with self._store_lock:
            try:
                errors = self._store.add(ERRORS_KEY, 0)
                failed = None
                if errors:
                    failed = next(
                        r for r in range(self.world_size) if self._store.check([f"error/{r}"])
                    )
                    exc, text = pickle.loads(self._store.get(f"error/{failed}"))
                remote = [r for r in range(self.world_size) if r not in self.local.ranks]
                beats = {r: self._store.add(f"heartbeat/{r}", 0) for r in remote}
            except Exception as exc:  # the store lives in this process: this is unexpected
                self._fail(f"the rendezvous store failed: {exc}")
        if failed is not None:
            logger.debug("worker rank %d failed:\n%s", failed, text)
            if isinstance(exc, MgpuError):
                self._fail(str(exc), exc)
            self._fail(f"worker rank {failed} failed: {type(exc).__name__}: {exc}")
        for rank, beat in beats.items():
            last = self._heartbeats.get(rank)
            if last is None or last[0] != beat:
                self._heartbeats[rank] = (beat, now)
            elif self._ready and now - last[1] > self.launch_config.heartbeat_timeout_s:
                self._fail(
                    f"worker rank {rank} (on another node) stopped its heartbeat "
                    f"{now - last[1]:.1f} s ago"
                )

    def rank_timings(self) -> dict[int, RankTiming]:
        """Each rank's cumulative step timings, as the latest step reply carried them (up to
        :data:`TIMING_EVERY_S` and a step or two behind; empty before the first gather arrives).
        Callable from any thread."""
        return dict(self._timings)

    def _fail(self, message: str, exc: BaseException | None = None) -> None:
        """Record the failure, stop every rank in the background, raise."""
        if self.error is None:
            self.error = message
        threading.Thread(target=self.shutdown, daemon=True, name="mgpu-stop").start()
        if exc is not None:
            raise exc
        raise WorkerError(message + "; the engine has stopped all its workers")

    def _wait(self, fn: Any) -> Any:
        """Run the blocking ``fn`` on a helper thread, watching liveness meanwhile."""
        box: queue.Queue[tuple[bool, Any]] = queue.Queue()

        def target() -> None:
            try:
                box.put((True, fn()))
            except BaseException as exc:
                box.put((False, exc))

        threading.Thread(target=target, daemon=True, name="mgpu-wait").start()
        while True:
            try:
                ok, value = box.get(timeout=POLL_S)
            except queue.Empty:
                self._check()
                continue
            if ok:
                return value
            self._check_store(force=True)
            raise value

    # ---- steps --------------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        """Receive the replies of each submitted message, in submission order."""
        while True:
            item = self._expected.get()
            if item is None:
                return
            step_id, ranks, reply_all = item
            try:
                replies = [self.control.receive_from(r) for r in ranks]
            except BaseException as exc:  # a peer died; collect() reports which one
                self._replies.put(exc)
                return
            for (got, _, timings), r in zip(replies, ranks, strict=True):
                if got != step_id:
                    self._replies.put(RuntimeError(f"rank {r} answered step {got}, not {step_id}"))
                    return
                if timings is not None:
                    self._timings = dict(enumerate(timings))
            values = [value for _, value, _ in replies]
            self._replies.put((step_id, values if reply_all else values[0]))

    def submit(self, method: str, *args: Any, reply_all: bool = False) -> int:
        """Send ``ModelRunner.method(*args)`` to every rank; returns the step id.

        Args:
            method: the runner method (``execute`` for a step).
            *args: its arguments (picklable, no tensors).
            reply_all: every rank replies (``call_all``); else only the output rank.
        """
        self._check()
        step_id = next(self._ids)
        gather_timings = False
        if method == "execute" and time.monotonic() - self._last_timing_gather >= TIMING_EVERY_S:
            gather_timings, self._last_timing_gather = True, time.monotonic()
        try:
            self.control.post(("call", step_id, method, args, reply_all, gather_timings))
        except Exception as exc:
            self._check_store(force=True)
            self._fail(f"cannot reach the workers: {exc}")
        self._outstanding.append(step_id)
        ranks = list(range(self.world_size)) if reply_all else [self.output_rank]
        self._expected.put((step_id, ranks, reply_all))
        return step_id

    @property
    def num_in_flight(self) -> int:
        """Steps submitted and not yet collected."""
        return len(self._outstanding)

    def collect(self) -> Any:
        """The reply to the oldest outstanding step (a list in rank order for ``reply_all``)."""
        if not self._outstanding:
            raise MgpuError("collect() without a submitted step")
        return self._collect_id(self._outstanding[0])

    def _collect_id(self, step_id: int) -> Any:
        while True:
            try:
                item = self._replies.get(timeout=POLL_S)
            except queue.Empty:
                self._check()
                continue
            if isinstance(item, BaseException):
                self._check()
                self._check_store(force=True)
                self._fail(f"lost contact with the workers: {item}")
            got, value = item
            self._outstanding.popleft()
            if got != step_id:
                self._fail(f"reply to step {got} arrived while waiting for step {step_id}")
            return value

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Call ``ModelRunner.method`` on every rank (nothing else in flight); replies by rank."""
        while self._outstanding:
            self.collect()
        self.submit(method, *args, reply_all=True)
        return self.collect()

    def execute(self, step: Any) -> Any:
        """Run one step on every rank and wait; returns the output rank's sampled tokens."""
        self.submit("execute", step)
        return self.collect()

    def shutdown(self) -> None:
        """Stop every rank: politely, then by force. Safe to call twice, from any thread."""
        with self._store_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._store.set(SHUTDOWN_KEY, b"1")
            except Exception:
                logger.debug("could not publish shutdown", exc_info=True)
        if self.error is None and hasattr(self, "control"):
            try:
                self.control.post(("shutdown",))
            except Exception:
                logger.debug("could not post shutdown", exc_info=True)
        if hasattr(self, "local"):
            self.local.stop()
        self._expected.put(None)
        if hasattr(self, "control"):
            # Tear gloo down now: left to interpreter exit, its threads abort the process.
            with contextlib.suppress(Exception):
                self.control.group.abort()
            receiver = getattr(self, "_receiver", None)
            if receiver is not None and receiver is not threading.current_thread():
                receiver.join(timeout=2)
