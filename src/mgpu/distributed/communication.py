"""The collectives of the model, in one place (STYLE.md convention 2).

Only the row-parallel linear, the vocab-parallel embedding, the LM head and the pipeline hand-off
call these, the worker calls :func:`gather_step_timings` once per step, and the model runner
:func:`tp_broadcast_tokens` before a step that feeds tokens only the output rank knows.
Each is a no-op when its group has one rank. Each one that moves the model's data is timed by
this rank's :data:`~mgpu.monitor.timing.TIMER` (a clock read on either side); the shared-memory
ones also report how long they waited for a peer to arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mgpu.distributed import parallel_state as ps
from mgpu.distributed.shm import ShmGroup
from mgpu.monitor.timing import TIMER


@torch.compiler.disable
def _shm_timed(shm: ShmGroup, collective: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """Run ``collective``, one of ``shm``'s, on ``x`` and record how long it waited for peers."""
    out = collective(x)
    TIMER.waited(shm.last_wait_s)
    return out


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group, in place."""
    if ps.get_tp_size() == 1:
        return x
    with TIMER.collective():
        shm = ps.get_tp_shm()
        if shm is not None and shm.fits(x):
            return _shm_timed(shm, shm.all_reduce, x)
        dist.all_reduce(x, group=ps.get_tp_group())
        return x


def tp_gather_last_dim(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate ``x`` along its last dim onto TP rank 0; other ranks get None.

    Used for vocab-parallel logits: (tokens, vocab / tp) on each rank -> (tokens, vocab) on rank 0.
    A gather moves 1/tp of what an all-gather does, and only rank 0 samples.
    """
    tp = ps.get_tp_size()
    if tp == 1:
        return x
    x = x.contiguous()
    with TIMER.collective():
        shm = ps.get_tp_shm()
        if shm is not None and shm.fits(x):
            return _shm_timed(shm, shm.gather_last_dim, x)
        is_dst = ps.get_tp_rank() == 0
        parts = [torch.empty_like(x) for _ in range(tp)] if is_dst else None
        dist.gather(x, parts, dst=ps.tp_first_rank(), group=ps.get_tp_group())
    return torch.cat(parts, dim=-1) if parts is not None else None


def tp_broadcast_tokens(x: torch.Tensor) -> torch.Tensor:
    """Overwrite ``x`` (n,) int64 with TP rank 0's ``x`` on every rank of the TP group, in place.

    The output rank (TP rank 0 of the last stage) alone samples; the other ranks of a
    single-stage layout get the tokens it sampled this way when the next step feeds them
    (async scheduling). It is the step's first collective, so a rank that reaches it late is
    waited for here: timed like the others, so that wait counts as waiting, not compute.
    """
    if ps.get_tp_size() == 1:
        return x
    with TIMER.collective():
        shm = ps.get_tp_shm()
        if shm is not None and shm.fits(x):
            return _shm_timed(shm, shm.broadcast_first, x)
        dist.broadcast(x, src=ps.tp_first_rank(), group=ps.get_tp_group())
        return x


def pp_send(x: torch.Tensor) -> dist.Work:
    """Start sending ``x`` to the next pipeline stage (same TP position) on the PP group.

    Returns the pending send: the caller keeps ``x`` alive and waits on it before reusing ``x``,
    so this stage can start its next micro-batch while the next stage takes this one.
    """
    return dist.isend(x, dst=ps.pp_neighbour(+1), group=ps.get_pp_group())


def pp_recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Receive a tensor of known shape from the previous pipeline stage, on the PP group."""
    out = torch.empty(shape, dtype=dtype, device=device)
    with TIMER.collective():
        dist.recv(out, src=ps.pp_neighbour(-1), group=ps.get_pp_group())
    return out


def gather_step_timings(x: torch.Tensor) -> tuple[dist.Work, list[torch.Tensor] | None]:
    """Start gathering ``x`` (5,) float64, one rank's seconds in a step, onto the output rank.

    Asynchronous, on the gloo timing group, so it never waits for a peer and never enters the
    model's own groups (NCCL on GPUs). Returns the pending work and, on the output rank, the
    (world_size,) list of tensors it fills in rank order. Not timed: it is not the model's.
    """
    group = ps.get_timing_group()
    dst = ps.output_rank()
    is_dst = dist.get_rank() == dst
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))] if is_dst else None
    return dist.gather(x, parts, dst=dst, group=group, async_op=True), parts
