"""How the HTTP server meets its connections and its end: read timeouts and a draining shutdown.

Two pieces on top of uvicorn:

- :func:`timed_h11_protocol`: uvicorn's h11 protocol with a read timeout. uvicorn closes idle
  keep-alive connections (``timeout_keep_alive``) but waits forever for a request that is sent
  half-way (a slow or stalled client holding a connection and a task); this protocol closes a
  connection whose request (headers and body) has not fully arrived ``timeout`` seconds after the
  connection opened or after its previous response.
- :class:`DrainingServer`: on SIGTERM or SIGINT, the server first drains. New requests get 503
  (``/health`` too, so a load balancer stops routing here) while the requests in flight run on;
  when the grace period is nearly over, whatever is still in flight is failed, so each stream ends
  with a final SSE error event instead of a cut connection; only then does uvicorn stop. A second
  signal stops at once.

::

    SIGTERM ──► draining: new requests 503 ──► all done, or grace period - 1 s
                                                  │ fail the rest (final SSE error events)
                                                  ▼
                                    uvicorn shutdown ──► engine and workers stop
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mgpu.server.app import OpenAIServing

logger = logging.getLogger("mgpu.server")

#: Time kept at the end of the grace period for failed streams to send their last event and for
#: uvicorn to close the connections (seconds).
FINAL_EVENT_MARGIN = 1.0


class _TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request does not arrive in time."""

    read_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._arm_read_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def _arm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        between_requests = self.cycle is None or self.cycle.response_complete
        if between_requests or self.conn.their_state is h11.SEND_BODY:
            self.transport.close()


def timed_h11_protocol(timeout: float) -> type[H11Protocol]:
    """The h11 protocol class closing connections whose request takes over ``timeout`` seconds.

    Args:
        timeout: seconds a client has to send a whole request (headers and body), counted from
            when the connection opened or its previous response ended.
    """
    return type("TimedH11Protocol", (_TimedH11Protocol,), {"read_timeout": timeout})


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains its requests before it stops (see the module docstring).

    Args:
        config: uvicorn's settings.
        serving: the request handlers (their ``draining`` flag and engine).
        shutdown_timeout: the grace period (seconds) from the signal to the last event sent.
    """

    def __init__(self, config: uvicorn.Config, serving: OpenAIServing, shutdown_timeout: float):
        super().__init__(config)
        self.serving = serving
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Remember the event loop (the signal handler schedules the drain on it)."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first signal starts draining; a second (or one before start-up) stops now."""
        if self._loop is None or self.serving.draining:
            super().handle_exit(sig, frame)
            return
        self.serving.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        assert self._loop is not None
        self._drain = self._loop.create_task(self._drain_requests())

    async def _drain_requests(self) -> None:
        engine = self.serving.engine
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, self.shutdown_timeout - FINAL_EVENT_MARGIN)
        if engine.num_in_flight:
            logger.warning(
                "shutting down: %d request(s) in flight get up to %g s to finish",
                engine.num_in_flight,
                self.shutdown_timeout,
            )
        while engine.num_in_flight and loop.time() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        if engine.num_in_flight:
            logger.warning(
                "shutting down: failing %d request(s) still in flight", engine.num_in_flight
            )
            engine.fail_all_requests("the server is shutting down")
            # Let the handlers write their final events before uvicorn closes the connections.
            end = loop.time() + FINAL_EVENT_MARGIN / 2
            while engine.num_in_flight and loop.time() < end:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
        self.should_exit = True


def serve(app: Any, serving: OpenAIServing, sock: socket.socket, settings: dict[str, Any]) -> None:
    """Run ``app`` on ``sock`` until a signal, then drain and stop.

    Args:
        app: the ASGI application.
        serving: its request handlers.
        sock: the listening socket.
        settings: ``log_level``, ``timeout_keep_alive``, ``timeout_request_read`` and
            ``shutdown_timeout`` (seconds).
    """
    level = settings["log_level"]
    config = uvicorn.Config(
        app,
        http=timed_h11_protocol(settings["timeout_request_read"]),
        log_level=level,
        access_log=level in ("debug", "info"),
        timeout_keep_alive=settings["timeout_keep_alive"],
        timeout_graceful_shutdown=max(1, round(FINAL_EVENT_MARGIN)),
    )
    DrainingServer(config, serving, settings["shutdown_timeout"]).run(sockets=[sock])
