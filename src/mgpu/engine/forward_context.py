"""The per-step forward context: what every layer may need about the step, set once around the
model's forward pass by the model runner (DESIGN.md, "Seams"; vLLM's ``set_forward_context``).

A layer reads it with :func:`get_forward_context` instead of taking extra forward arguments, so
the model files keep their ``(input_ids, positions, meta, hidden, residual)`` signature whatever
plugs into them. Today it carries the LoRA token mapping and the step's attention metadata (the
attention layers still receive theirs as an argument; the context is its home for new readers)::

    runner._forward(step)
      with set_forward_context(ForwardContext(meta, lora=mapping)):
          model(input_ids, positions, meta, ...)      # any layer: get_forward_context().lora

One context is current per process at a time: a worker runs one forward pass at a time, on one
thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mgpu.layers.attention import AttentionMetadata


@dataclass
class LoRAMapping:
    """Which LoRA slot each token of the step uses, in the form the LoRA layers multiply by.

    Attributes:
        token_slots: (T,) slot of each token, -1 for the base model.
        mask: (T, max_loras * max_lora_rank) 1 on the rank columns of the token's slot, else 0:
            multiplying ``x A_all^T`` by it keeps, for each token, only its own adapter's rank
            directions, so one matmul pair serves every adapter of a mixed batch.
    """

    token_slots: torch.Tensor
    mask: torch.Tensor


@dataclass
class ForwardContext:
    """Per-step metadata of one forward pass.

    Attributes:
        attn_metadata: the step's attention metadata.
        lora: the LoRA token mapping (None: no token of the step uses an adapter).
    """

    attn_metadata: AttentionMetadata | None = None
    lora: LoRAMapping | None = None


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``context`` current for the duration of a forward pass (restoring the previous one).

    Args:
        context: the step's context.
    """
    global _current
    previous, _current = _current, context
    try:
        yield context
    finally:
        _current = previous


def get_forward_context() -> ForwardContext | None:
    """The current step's context; None outside a forward pass (e.g. a bare model call)."""
    return _current
