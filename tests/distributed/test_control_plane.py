"""The control plane's message framing: frames reused between messages never leak one message's
bytes into the next, and a message longer than the frame travels whole (its remainder)."""

from __future__ import annotations

import pickle

import pytest

from mgpu.distributed import control
from mgpu.engine.messages import SeqChunk, StepInput


@pytest.mark.parametrize("size", [0, 10, control.FRAME_BYTES - 100, control.FRAME_BYTES * 3])
def test_messages_round_trip_through_one_reused_frame(size: int) -> None:
    frame = control._frame()
    long = ("x" * size, list(range(7)))
    short = StepInput([SeqChunk(3, [5], 17, [0, 4, 2], True)])
    for message in (long, short, long, short):  # a short one after a long one, same frame
        remainder = control._encode(message, frame)
        fits = len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)) <= (
            control.FRAME_BYTES - 8
        )
        assert (remainder is None) == fits
        got = control._decode(frame, remainder)
        assert got == message if message is long else got.chunks == message.chunks
