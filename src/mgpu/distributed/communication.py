"""The collectives of the model, in one place (STYLE.md convention 2).

Only the row-parallel linear, the vocab-parallel embedding, the LM head and the pipeline hand-off
call
these. Each is a no-op when its group has one rank. Each one that moves data is timed by this
rank's :data:`~mgpu.monitor.timing.TIMER` (a clock read on either side).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mgpu.distributed import parallel_state as ps
from mgpu.monitor.timing import TIMER


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group, in place."""
    if ps.get_tp_size() == 1:
        return x
    with TIMER.collective():
        shm = ps.get_tp_shm()
        if shm is not None and shm.fits(x):
            return shm.all_reduce(x)
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
            return shm.gather_last_dim(x)
        is_dst = ps.get_tp_rank() == 0
        parts = [torch.empty_like(x) for _ in range(tp)] if is_dst else None
        dist.gather(x, parts, dst=ps.tp_first_rank(), group=ps.get_tp_group())
    return torch.cat(parts, dim=-1) if parts is not None else None


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
