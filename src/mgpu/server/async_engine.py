"""Drives a synchronous :class:`~mgpu.engine.llm_engine.LLMEngine` from one background thread.

::

    event loop (HTTP handlers)              engine thread
    ──────────────────────────              ─────────────
    generate() ── add ──► command queue ──► add_request / abort_request
                                            step() ──► RequestOutput of every request it moved
    per-request queues ◄── one call_soon_threadsafe per step ──┘

Every engine call happens on the engine thread, in the order it was submitted, so an abort can
never overtake the add it cancels and the HTTP event loop never waits for a step. The thread sleeps
while there is no work. A step's outputs reach the event loop in one wake-up: each wake-up is a
write to the loop's self-pipe and a pass of its selector, and one per request per step cost the
server 600 us of CPU per step at 32 streaming clients against 180 us for one per step (a thread
handing 32 outputs to 32 asyncio queues, 2-core VM, 2026-12-08), CPU the workers share.

Two kinds of failure, kept apart:

- one request's own (it could not be sampled or detokenised, its output finished with
  ``finish_reason="error"``): that request alone fails with :class:`RequestFailedError`;
- the engine's (a worker died, a collective failed): every in-flight request fails with
  :class:`EngineDeadError` at once, the engine forgets them (``/metrics`` shows nothing running)
  and stays down: a server in that state answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass

from mgpu.engine.llm_engine import LLMEngine, RequestOutput
from mgpu.errors import MgpuError, WorkerError
from mgpu.sampling import SamplingParams

logger = logging.getLogger("mgpu.server")

Item = RequestOutput | BaseException
Deliver = Callable[[Item], None]


@dataclass
class _Listener:
    """Where a request's outputs go: ``put`` called on ``loop``'s thread (an asyncio caller), or
    directly from the engine thread when ``loop`` is None (a thread-safe queue)."""

    put: Deliver
    loop: asyncio.AbstractEventLoop | None = None


def _put_all(deliveries: list[tuple[Deliver, Item]]) -> None:
    """Hand each item to its request (on the event loop's thread)."""
    for put, item in deliveries:
        put(item)


#: How often an idle engine thread checks that its workers are still alive (seconds).
HEALTH_CHECK_INTERVAL = 1.0


class EngineDeadError(MgpuError):
    """The engine has stopped (a worker died, or the server is shutting down)."""


class ServerShutdownError(EngineDeadError):
    """The server is shutting down and its grace period ran out before this request finished."""


class RequestFailedError(MgpuError):
    """This request failed on its own (sampling or detokenising it raised); the engine runs on."""


def _check_failed(out: RequestOutput) -> None:
    """Raise :class:`RequestFailedError` when a completion of ``out`` finished with an error."""
    for c in out.outputs:
        if c.finish_reason == "error":
            raise RequestFailedError(str(c.stop_reason or "the request failed in the engine"))


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _FailAll:
    message: str


class AsyncEngine:
    """Runs ``engine.step()`` on a background thread and hands each output to its request.

    Args:
        engine: the engine; from now on only this object's thread calls it.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.error: str | None = None
        self._cond = threading.Condition()
        self._commands: deque[_Add | _Abort | _FailAll] = deque()
        self._listeners: dict[str, _Listener] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mgpu-engine", daemon=True)
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        """Whether the engine runs and every worker is alive."""
        return self.error is None and self.engine.is_healthy

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished, failed or aborted."""
        return len(self._listeners)

    # ---- the event-loop side --------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora_request: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Submit a request and yield its outputs until it finishes.

        Outputs that arrive faster than the caller reads them are merged: each output carries the
        full text and tokens so far, so only the newest matters. Leaving the loop early (a client
        that disconnected, a cancelled task) aborts the request and frees its KV blocks.

        Args:
            request_id: unique among the requests in flight.
            prompt_token_ids: the prompt, already checked with ``engine.check_prompt``.
            params: sampling parameters.
            lora_request: the served LoRA adapter to run with (None: the base model).
        """
        outputs: asyncio.Queue[Item] = asyncio.Queue()
        listener = _Listener(outputs.put_nowait, asyncio.get_running_loop())
        self._start(request_id, prompt_token_ids, params, listener, lora_request)
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                while not outputs.empty() and not isinstance(item, BaseException):
                    item = outputs.get_nowait()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                _check_failed(item)
                finished = item.finished
                yield item
        finally:
            self._stop(request_id, finished)

    def generate_blocking(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Iterator[RequestOutput]:
        """Like :meth:`generate`, for a caller without an event loop (the terminal chat).

        Args:
            request_id: unique among the requests in flight.
            prompt_token_ids: the prompt, already checked with ``engine.check_prompt``.
            params: sampling parameters.
        """
        outputs: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._start(request_id, prompt_token_ids, params, _Listener(outputs.put))
        finished = False
        try:
            while not finished:
                item = outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                _check_failed(item)
                finished = item.finished
                yield item
        finally:
            self._stop(request_id, finished)

    def _start(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        listener: _Listener,
        lora_request: str | None = None,
    ) -> None:
        if self.error is not None:
            raise EngineDeadError(self.error)
        if request_id in self._listeners:
            raise ValueError(f"request id {request_id!r} is already in flight")
        self._listeners[request_id] = listener
        if self.error is not None:  # the engine died while this request was being registered
            self._listeners.pop(request_id, None)
            raise EngineDeadError(self.error)
        self._submit(_Add(request_id, list(ids), params, lora_request))

    def _stop(self, request_id: str, finished: bool) -> None:
        self._listeners.pop(request_id, None)
        if not finished:
            self._submit(_Abort(request_id))

    def fail_all_requests(self, message: str) -> None:
        """Abort every request in flight and fail each with :class:`ServerShutdownError`.

        The engine keeps running; the server calls this when its shutdown grace period runs out,
        so that every stream still open gets a final error event.

        Args:
            message: why, for the clients.
        """
        self._submit(_FailAll(message))

    def _submit(self, command: _Add | _Abort | _FailAll) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def shutdown(self) -> None:
        """Stop the thread (after its current step), fail what is in flight, stop the workers.

        Safe to call more than once.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self.error is None:
            self.error = "the server is shutting down"
        self._fail_all(self.error)
        self.engine.shutdown()

    # ---- the engine thread ----------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._stopping or self._commands or self.engine.has_unfinished_requests())

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                ready = self._cond.wait_for(self._has_work, HEALTH_CHECK_INTERVAL)
                stopping = self._stopping
                commands = list(self._commands)
                self._commands.clear()
            if stopping:
                return
            if not ready:
                if not engine.is_healthy:
                    self._die("a worker process died while the engine was idle")
                    return
                continue
            for command in commands:
                self._apply(command)
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except WorkerError as exc:
                self._die(str(exc))
                return
            except Exception as exc:
                logger.exception("engine step failed")
                self._die(f"the engine failed: {exc}")
                return
            self._send_all([(out.request_id, out) for out in outputs])

    def _apply(self, command: _Add | _Abort | _FailAll) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            return
        if isinstance(command, _FailAll):
            for request_id in list(self._listeners):
                self.engine.abort_request(request_id)
            self._fail_all(command.message, ServerShutdownError)
            return
        if command.request_id not in self._listeners:
            return  # cancelled before it reached the engine
        try:
            self.engine.add_request(
                command.request_id,
                None,
                command.params,
                prompt_token_ids=command.prompt_token_ids,
                lora_request=command.lora_request,
            )
        except Exception as exc:
            self._send(command.request_id, exc)

    def _send(self, request_id: str, item: Item) -> None:
        self._send_all([(request_id, item)])

    def _send_all(self, items: list[tuple[str, Item]]) -> None:
        """Deliver each item to its request: one wake-up per event loop for all of them."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Deliver, Item]]] = {}
        for request_id, item in items:
            listener = self._listeners.get(request_id)
            if listener is None:
                continue
            if listener.loop is None:
                listener.put(item)
            else:
                by_loop.setdefault(listener.loop, []).append((listener.put, item))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # the event loop has closed (the server is exiting)
                for request_id, _ in items:
                    listener = self._listeners.get(request_id)
                    if listener is not None and listener.loop is loop:
                        self._listeners.pop(request_id, None)

    def _die(self, message: str) -> None:
        self.error = message
        logger.error("%s; failing every request in flight", message)
        in_flight = list(self._listeners)
        self._fail_all(message)
        # Forget them in the scheduler too (no worker is called), so /metrics is not stale.
        for request_id in in_flight:
            self.engine.abort_request(request_id)
        self.engine.shutdown()

    def _fail_all(self, message: str, error: type[EngineDeadError] = EngineDeadError) -> None:
        request_ids = list(self._listeners)
        self._send_all([(request_id, error(message)) for request_id in request_ids])
        for request_id in request_ids:
            self._listeners.pop(request_id, None)
