"""The engine's control plane: one gloo group holding the engine process and every rank.

::

    control rank 0            engine process (scheduler, tokenizer)
    control rank 1 + r        worker of global rank r (r = 0 .. world_size - 1)

    engine ── broadcast(step message) ──► every rank          (one collective per step)
    engine ◄── send(reply) ───────────── the output rank      (only it answers a step)

The group is a ``ProcessGroupGloo`` built directly on a prefix of the rendezvous store, apart from
the model's own process groups (the workers' default group, NCCL on GPUs), so the engine process
never calls ``init_process_group`` and a caller's own ``torch.distributed`` state is left alone.
It is the same code whether the ranks are local processes or live on other machines.

Messages are pickled into a fixed-size uint8 frame whose first 8 bytes hold the length; a message
longer than the frame follows in a second transfer of exactly its remainder. Pickle is safe here:
both ends are processes of the same engine, joined through its own store.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

#: Bytes of the first transfer of every message: a typical step message fits in one.
FRAME_BYTES = 64 * 1024
_HEADER = 8
_REPLY_TAG = 17


def _encode(obj: Any, frame: torch.Tensor) -> torch.Tensor | None:
    """Write the pickle of ``obj`` into ``frame`` (FRAME_BYTES uint8, reused); return the
    remainder that does not fit, or None.

    The bytes go through numpy views: torch's small copies and fills cost tens of microseconds
    each (a fill of a 64 KiB frame wakes the intra-op threads), and a fresh frame per message
    had made encoding a one-token step message take 0.2-2 ms on a 2-core VM.
    """
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = frame.numpy()
    view[:_HEADER] = np.frombuffer(len(data).to_bytes(_HEADER, "little"), dtype=np.uint8)
    head = min(len(data), FRAME_BYTES - _HEADER)
    view[_HEADER : _HEADER + head] = np.frombuffer(data, dtype=np.uint8, count=head)
    if head == len(data):
        return None
    return torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8)


def _length(frame: torch.Tensor) -> int:
    return int.from_bytes(frame.numpy()[:_HEADER].tobytes(), "little")


def _decode(frame: torch.Tensor, remainder: torch.Tensor | None) -> Any:
    n = _length(frame)
    data = frame.numpy()[_HEADER : _HEADER + min(n, FRAME_BYTES - _HEADER)].tobytes()
    if remainder is not None:
        data += remainder.numpy().tobytes()
    return pickle.loads(data)


def _frame() -> torch.Tensor:
    return torch.empty(FRAME_BYTES, dtype=torch.uint8)


class ControlPlane:
    """One end of the control group (see the module docstring).

    Args:
        store: the engine's rendezvous store.
        rank: 0 for the engine, ``1 + global rank`` for a worker.
        size: ``world_size + 1``.
        timeout_s: how long one transfer may wait for its peer.
        threads: gloo threads; each broadcast in flight holds one on the engine's side, so this
            bounds how many steps may be outstanding.
    """

    def __init__(self, store: dist.Store, rank: int, size: int, timeout_s: float, threads: int = 2):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=timeout_s)
        opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        opts._threads = threads
        self.rank, self.size = rank, size
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, opts)
        self._broadcast_opts = dist.BroadcastOptions()
        self._broadcast_opts.rootRank = 0
        # Outstanding broadcasts of the engine and the tensors they read: kept alive until done,
        # then their frames are reused (``_spare``).
        self._pending: list[tuple[Any, list[torch.Tensor]]] = []
        self._spare: list[torch.Tensor] = []
        # One thread receives on each end (the engine's reply receiver, the worker's loop), and
        # sends wait for their transfer, so one frame each way is reused for every message.
        self._recv_frame, self._send_frame = _frame(), _frame()

    # ---- engine side --------------------------------------------------------------------------

    def post(self, message: Any) -> None:
        """Broadcast ``message`` to every worker without waiting for them to take it."""
        pending = []
        for work, tensors in self._pending:
            if not work.is_completed():
                pending.append((work, tensors))
            elif tensors[0].numel() == FRAME_BYTES:
                self._spare.append(tensors[0])
        self._pending = pending
        frame = self._spare.pop() if self._spare else _frame()
        remainder = _encode(message, frame)
        self._pending.append((self.group.broadcast([frame], self._broadcast_opts), [frame]))
        if remainder is not None:
            work = self.group.broadcast([remainder], self._broadcast_opts)
            self._pending.append((work, [remainder]))

    def receive_from(self, worker_rank: int) -> Any:
        """Block until the worker of global rank ``worker_rank`` sends a reply; return it."""
        src = worker_rank + 1
        frame = self._recv_frame
        self.group.recv([frame], src, _REPLY_TAG).wait()
        n = _length(frame)
        remainder = None
        if n > FRAME_BYTES - _HEADER:
            remainder = torch.empty(n - (FRAME_BYTES - _HEADER), dtype=torch.uint8)
            self.group.recv([remainder], src, _REPLY_TAG).wait()
        return _decode(frame, remainder)

    # ---- worker side --------------------------------------------------------------------------

    def next_message(self) -> Any:
        """Block until the engine broadcasts the next message; return it."""
        frame = self._recv_frame
        self.group.broadcast([frame], self._broadcast_opts).wait()
        n = _length(frame)
        remainder = None
        if n > FRAME_BYTES - _HEADER:
            remainder = torch.empty(n - (FRAME_BYTES - _HEADER), dtype=torch.uint8)
            self.group.broadcast([remainder], self._broadcast_opts).wait()
        return _decode(frame, remainder)

    def reply(self, message: Any) -> None:
        """Send ``message`` to the engine."""
        frame = self._send_frame
        remainder = _encode(message, frame)
        self.group.send([frame], 0, _REPLY_TAG).wait()
        if remainder is not None:
            self.group.send([remainder], 0, _REPLY_TAG).wait()
