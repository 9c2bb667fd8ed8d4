"""Column- and row-parallel linear layers (Megatron-style), sharded at construction.

Each parameter carries a ``weight_loader(param, loaded, shard_id)`` that takes this rank's slice of
a
full checkpoint tensor. ``loaded`` is lazy (a safetensors slice): indexing it reads only the rows or
columns this rank owns, so no rank ever materialises the full matrix.

::

    ColumnParallelLinear  W (out, in):  rank r holds rows    [r*out/tp, (r+1)*out/tp)   -> no comm
    RowParallelLinear     W (out, in):  rank r holds columns [r*in/tp,  (r+1)*in/tp)    -> all-
    reduce
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mgpu.distributed import parallel_state as ps
from mgpu.distributed.communication import tp_all_reduce
from mgpu.errors import ModelLoadError


class LazyTensor(Protocol):
    """A checkpoint tensor that reads only the part it is indexed with."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: object) -> torch.Tensor: ...


def check_shape(loaded: LazyTensor, expected: Sequence[int], what: str) -> None:
    """Fail with the tensor's name and both shapes when a checkpoint tensor has the wrong shape."""
    if tuple(loaded.shape) != tuple(expected):
        raise ModelLoadError(
            f"checkpoint tensor {what} has shape {tuple(loaded.shape)}, expected {tuple(expected)} "
            "from config.json: the weights do not match the config"
        )


def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype))


def load_replicated(param: nn.Parameter, loaded: LazyTensor, shard_id: object = None) -> None:
    """Loader of a parameter every rank holds in full (norms, biases of row-parallel layers)."""
    check_shape(loaded, param.shape, getattr(param, "checkpoint_name", "?"))
    _copy(param, loaded[...])


def _param(shape: tuple[int, ...], loader: object) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by output rows; each rank returns its slice of ``y``.

    Args:
        input_size: width of x.
        output_sizes: widths of the fused outputs, e.g. ``[inter, inter]`` for gate/up; each is
        split
            over the TP ranks separately so a rank holds ``[gate_r; up_r]``.
        bias: whether the projection has a bias.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        local_sizes: Sequence[int] | None = None,
    ):
        super().__init__()
        tp = ps.get_tp_size()
        if local_sizes is None:
            for size in output_sizes:
                if size % tp:
                    raise ModelLoadError(f"output width {size} does not divide by TP size {tp}")
            local_sizes = [s // tp for s in output_sizes]
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.local_sizes = list(local_sizes)
        self.weight = _param((sum(self.local_sizes), input_size), self.weight_loader)
        self.bias = _param((sum(self.local_sizes),), self.weight_loader) if bias else None

    def shard_rows(self, shard_id: int) -> tuple[int, int, int]:
        """(offset in the local param, first row in the full tensor, rows) of output ``shard_id``"""
        local = self.local_sizes[shard_id]
        return sum(self.local_sizes[:shard_id]), ps.get_tp_rank() * local, local

    def full_shape(self, param: nn.Parameter, shard_id: int) -> tuple[int, ...]:
        """Checkpoint shape of fused output ``shard_id`` of ``param``."""
        rows = self.output_sizes[shard_id]
        return (rows, self.input_size) if param.dim() == 2 else (rows,)

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: int = 0) -> None:
        """Copy this rank's rows of fused output ``shard_id`` from the full checkpoint tensor."""
        check_shape(loaded, self.full_shape(param, shard_id), param.checkpoint_name)  # type: ignore[attr-defined]
        offset, start, rows = self.shard_rows(shard_id)
        _copy(param[offset : offset + rows], loaded[start : start + rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, input_size) -> (tokens, sum(output_sizes) / tp)."""
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection, split by heads; KV heads replicated when TP > KV heads.

    With 8 query heads, 2 KV heads and TP 4, rank r holds query heads {2r, 2r+1} and KV head r // 2:
    ranks 0,1 share KV head 0 and ranks 2,3 share KV head 1, so each rank computes attention
    locally.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, total_heads: int, total_kv_heads: int, bias: bool
    ):
        tp = ps.get_tp_size()
        self.total_heads, self.total_kv_heads, self.head_dim = total_heads, total_kv_heads, head_dim
        self.num_heads = total_heads // tp
        self.num_kv_heads = max(1, total_kv_heads // tp)
        # Ranks that share one KV head when it is replicated (1 when the heads split evenly).
        self.kv_replicas = max(1, tp // total_kv_heads)
        kv_rows = total_kv_heads * head_dim
        super().__init__(
            hidden_size,
            [total_heads * head_dim, kv_rows, kv_rows],
            bias,
            local_sizes=[self.num_heads * head_dim] + [self.num_kv_heads * head_dim] * 2,
        )

    def shard_rows(self, shard_id: int) -> tuple[int, int, int]:
        """Query shard 0 splits by TP rank; k/v shards 1 and 2 by ``tp_rank // kv_replicas``."""
        local = self.local_sizes[shard_id]
        index = ps.get_tp_rank() if shard_id == 0 else ps.get_tp_rank() // self.kv_replicas
        return sum(self.local_sizes[:shard_id]), index * local, local


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by input columns; partial sums all-reduced over TP.

    The input arrives already split (the output of a column-parallel layer), so the only
    communication is the all-reduce of the (tokens, output_size) result.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        tp = ps.get_tp_size()
        if input_size % tp:
            raise ModelLoadError(f"input width {input_size} does not divide by TP size {tp}")
        self.input_size, self.output_size = input_size, output_size
        self.local_input = input_size // tp
        self.weight = _param((output_size, self.local_input), self.weight_loader)
        self.bias = _param((output_size,), load_replicated) if bias else None

    def weight_loader(
        self, param: nn.Parameter, loaded: LazyTensor, shard_id: object = None
    ) -> None:
        """Copy this rank's columns from the full (output, input) checkpoint tensor."""
        check_shape(loaded, (self.output_size, self.input_size), param.checkpoint_name)  # type: ignore[attr-defined]
        start = ps.get_tp_rank() * self.local_input
        _copy(param, loaded[:, start : start + self.local_input])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, input_size / tp) -> (tokens, output_size), summed over the TP group."""
        y = tp_all_reduce(F.linear(x, self.weight))
        # The bias is added once, after the reduction, not once per rank.
        return y + self.bias if self.bias is not None else y
