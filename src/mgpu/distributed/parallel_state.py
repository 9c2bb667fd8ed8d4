"""Process groups for tensor and pipeline parallelism.

Rank layout (TP innermost), worked example with 8 ranks = TP 2 x PP 4::

    rank = pp_rank * tp_size + tp_rank

              tp_rank 0   tp_rank 1
    pp_rank 0    0           1        layers [0, L/4)      <- embeds tokens
    pp_rank 1    2           3
    pp_rank 2    4           5
    pp_rank 3    6           7        layers [3L/4, L)     <- rank 6 samples

    TP groups: {0,1} {2,3} {4,5} {6,7}   (all-reduce inside a layer)
    PP groups: {0,2,4,6} {1,3,5,7}       (hidden states passed stage to stage)
    timing group: {0..7}, always gloo     (step timings gathered onto rank 6, the output rank)

Layers ask for the TP or PP group through the accessors below, never for the global group. With one
rank and no ``torch.distributed`` initialised, every size is 1 and collectives are no-ops, so a
layer
can be built and tested in a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mgpu.distributed.shm import ShmGroup


@dataclass
class _State:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    tp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    tp_shm: ShmGroup | None = None
    timing_group: dist.ProcessGroup | None = None


_STATE = _State()


def rank_layout(world_size: int, tp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Global ranks of every TP group and every PP group (see the module docstring)."""
    pp_size = world_size // tp_size
    tp_groups = [[p * tp_size + t for t in range(tp_size)] for p in range(pp_size)]
    pp_groups = [[p * tp_size + t for p in range(pp_size)] for t in range(tp_size)]
    return tp_groups, pp_groups


def init_distributed(
    backend: str,
    rank: int,
    world_size: int,
    tp_size: int,
    store: dist.Store,
    timeout_s: float = 300.0,
    tp_shm_buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Join the global group through ``store`` and create the TP and PP groups.

    Every rank must call this with the same arguments except ``rank``; ``new_group`` is collective,
    so all ranks create all groups in the same order.

    Args:
        backend: ``gloo`` or ``nccl``.
        rank: this process's global rank.
        world_size: number of ranks.
        tp_size: tensor-parallel size.
        store: the rendezvous store the engine hosts.
        timeout_s: how long a collective may wait for a peer.
        tp_shm_buffers: shared-memory buffers of this rank's TP group (CPU ranks on one host):
            TP all-reduces and gathers then go through :mod:`mgpu.distributed.shm`.
    """
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    tp_groups, pp_groups = rank_layout(world_size, tp_size)
    state = _State(tp_size=tp_size, pp_size=world_size // tp_size)
    for ranks in tp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            state.tp_group, state.tp_ranks, state.tp_rank = group, tuple(ranks), ranks.index(rank)
    for ranks in pp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            state.pp_group, state.pp_ranks, state.pp_rank = group, tuple(ranks), ranks.index(rank)
    if world_size > 1:
        # CPU tensors on every backend: the monitor's timing gathers never touch the device.
        state.timing_group = dist.new_group(list(range(world_size)), backend="gloo")
    if tp_shm_buffers is not None and tp_size > 1:
        state.tp_shm = ShmGroup(state.tp_rank, *tp_shm_buffers)
    global _STATE
    _STATE = state


def destroy_distributed() -> None:
    """Leave the process group (idempotent)."""
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = _State()


def get_tp_size() -> int:
    """Number of ranks in this rank's tensor-parallel group."""
    return _STATE.tp_size


def get_tp_rank() -> int:
    """This rank's index inside its tensor-parallel group."""
    return _STATE.tp_rank


def get_tp_shm() -> ShmGroup | None:
    """The shared-memory twin of the TP group, when its ranks share a CPU host."""
    return _STATE.tp_shm


def get_tp_group() -> dist.ProcessGroup | None:
    """The tensor-parallel group (None when TP size is 1)."""
    return _STATE.tp_group


def get_pp_group() -> dist.ProcessGroup | None:
    """The pipeline-parallel group: this TP position's rank in every stage."""
    return _STATE.pp_group


def get_pp_size() -> int:
    """Number of pipeline stages."""
    return _STATE.pp_size


def get_pp_rank() -> int:
    """This rank's pipeline stage."""
    return _STATE.pp_rank


def pp_neighbour(offset: int) -> int:
    """Global rank of the same TP position ``offset`` stages away (+1 next, -1 previous)."""
    return _STATE.pp_ranks[_STATE.pp_rank + offset]


def tp_first_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (the destination of gathers)."""
    return _STATE.tp_ranks[0]


def output_rank() -> int:
    """Global rank that samples and replies to steps: TP rank 0 of the last pipeline stage."""
    return (_STATE.pp_size - 1) * _STATE.tp_size


def get_timing_group() -> dist.ProcessGroup | None:
    """The gloo group of all ranks that carries step timings (None with one rank)."""
    return _STATE.timing_group
