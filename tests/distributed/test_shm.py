"""Shared-memory collectives against values each spawned rank computes itself."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from mgpu.distributed.shm import ShmGroup, make_buffers, shm_collectives_supported

pytestmark = pytest.mark.skipif(not shm_collectives_supported(), reason="x86-64 only")
SIZE = 3


def _rank_tensor(rank: int, call: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * call + rank)
    return torch.randn(5, 7, generator=gen).to(dtype)


def _worker(rank: int, flags: torch.Tensor, data: torch.Tensor, errors: torch.Tensor) -> None:
    group = ShmGroup(rank, flags, data)
    for call in range(50):  # many calls: both buffers reused, ranks racing ahead of each other
        dtype = torch.bfloat16 if call % 3 == 0 else torch.float32
        x = _rank_tensor(rank, call, dtype)
        if call % 2:
            # One rounding of the exact sum (bf16 parts accumulate in float32, as torch.sum does).
            expected = torch.stack([_rank_tensor(r, call, dtype) for r in range(SIZE)]).sum(0)
            got = group.all_reduce(x.clone())
            errors[rank] += int(not torch.equal(got, expected))
        else:
            parts = [_rank_tensor(r, call, dtype) for r in range(SIZE)]
            got = group.gather_last_dim(x)
            if rank == 0:
                errors[rank] += int(not torch.equal(got, torch.cat(parts, dim=-1)))
            else:
                errors[rank] += int(got is not None)


def test_all_reduce_and_gather_match_local_results() -> None:
    flags, data = make_buffers(SIZE, 4096)
    errors = torch.zeros(SIZE, dtype=torch.int64).share_memory_()
    mp.spawn(_worker, args=(flags, data, errors), nprocs=SIZE)
    assert errors.tolist() == [0] * SIZE


def test_large_tensors_do_not_fit() -> None:
    flags, data = make_buffers(2, 64)
    group = ShmGroup(0, flags, data)
    assert group.fits(torch.zeros(16))
    assert not group.fits(torch.zeros(17))
