"""Column- and row-parallel linear layers (Megatron-style), sharded at construction.

Each parameter carries a ``weight_loader(param, loaded, shard_id)`` that takes this rank's slice of
a full checkpoint tensor. ``loaded`` is lazy (a safetensors slice, a GGUF tensor): indexing it reads
only the rows or columns this rank owns, so no rank ever materialises the full matrix.

::

    ColumnParallelLinear  W (out, in): rank r holds rows    [r*out/tp, (r+1)*out/tp)  -> no comm
    RowParallelLinear     W (out, in): rank r holds columns [r*in/tp,  (r+1)*in/tp)   -> all-reduce

A width the TP size does not divide (an MLP's intermediate size, ``pad=True``) is padded: every
rank holds ``ceil(width / tp)`` rows or columns (rounded up to the int4 group size when quantizing
to int4), and the rows or columns past the checkpoint's width are zeros. For the gated MLP that is
exact: a zero gate/up row gives ``act(0) * 0 = 0``, and a zero down column adds nothing::

    intermediate 10, TP 4 -> 3 per rank: rank 0 [0, 3), rank 1 [3, 6), rank 2 [6, 9),
                                          rank 3 [9, 10) + 2 zero rows

The layer owns this geometry; how the shard is stored and multiplied (plain float, int8, int4,
converted GGUF blocks) is its ``quant_method`` (see ``layers.quantization``), chosen at
construction from the active :func:`~mgpu.layers.quantization.base.quantization_scope`.
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
from mgpu.layers.matmul import dense_linear, pack_module_weight
from mgpu.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    current_quant_config,
)


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


def padded_shard(size: int, tp: int, multiple: int = 1) -> int:
    """Rows (or columns) of a ``size``-wide dimension that each of ``tp`` ranks holds.

    ``size / tp`` when it divides; otherwise ``ceil(size / tp)`` rounded up to ``multiple``, the
    ranks past ``size`` holding zeros.

    Args:
        size: the checkpoint's width.
        tp: tensor-parallel size.
        multiple: what a padded shard is rounded up to (a quantization group).
    """
    if size % tp == 0:
        return size // tp
    local = -(-size // tp)
    return -(-local // multiple) * multiple


def _pad_multiple(quant_config: QuantizationConfig | None) -> int:
    """int4 packs its columns in groups; a padded shard keeps whole groups (1 otherwise)."""
    config = quant_config if quant_config is not None else current_quant_config()
    if getattr(config, "bits", None) == 4:
        return int(getattr(config, "group_size", 1))
    return 1


class _FloatView:
    """A checkpoint tensor without its ``read_packed``: a padded shard is read as floats and
    padded, since a GGUF file's packed blocks cannot be padded in place."""

    def __init__(self, loaded: LazyTensor):
        self._loaded = loaded
        self.shape = loaded.shape

    def __getitem__(self, index: object) -> torch.Tensor:
        return self._loaded[index]


def _clip(window: slice, size: int) -> slice:
    return slice(min(window.start, size), min(window.stop, size))


def _param(shape: tuple[int, ...], loader: object) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class UnquantizedLinearMethod(LinearMethodBase):
    """Weights kept in the model dtype; :func:`~mgpu.layers.matmul.dense_linear`. The default of
    every parallel linear."""

    def create_weights(self, layer: LinearBase) -> None:
        """A float ``(local out, local in)`` weight."""
        layer.weight = _param((sum(layer.local_sizes), layer.local_input), layer.weight_loader)

    def weight_loader(
        self, layer: LinearBase, param: nn.Parameter, loaded: LazyTensor, shard_id: int
    ) -> None:
        """Copy this rank's slice of fused output ``shard_id`` into its rows of ``weight``."""
        offset, _, rows = layer.shard_rows(shard_id)
        _copy(param[offset : offset + rows], layer.read_shard(loaded, shard_id, param))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """On CPU, reorder the loaded weight for oneDNN (same values and bytes; see
        :mod:`mgpu.layers.matmul`)."""
        pack_module_weight(layer)

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float shard's product (:func:`~mgpu.layers.matmul.dense_linear`)."""
        return dense_linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Geometry shared by the parallel linears, and the hand-off to their ``quant_method``.

    Args:
        input_size: full width of x.
        output_sizes: full widths of the fused outputs (one entry for an unfused projection).
        local_input: columns of W this rank holds.
        local_sizes: rows of each fused output this rank holds.
        input_start: first column of W this rank holds.
        quant_config: the quantization (default: the active ``quantization_scope``'s).
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        local_input: int,
        local_sizes: Sequence[int],
        input_start: int,
        quant_config: QuantizationConfig | None,
    ):
        super().__init__()
        self.input_size, self.local_input, self.input_start = input_size, local_input, input_start
        self.output_sizes = list(output_sizes)
        self.local_sizes = list(local_sizes)
        # Set by a subclass that pads its shards (see the module docstring).
        self.is_padded: bool = getattr(self, "is_padded", False)
        config = quant_config if quant_config is not None else current_quant_config()
        self.quant_method: LinearMethodBase = (
            config.get_linear_method(self) if config is not None else UnquantizedLinearMethod()
        )
        self.quant_method.create_weights(self)
        #: The LoRA delta ``lora(x, y) -> y + delta`` of served adapters (``mgpu.lora``), if any.
        self.lora: nn.Module | None = None

    def shard_rows(self, shard_id: int) -> tuple[int, int, int]:
        """(offset in the local param, first row in the full tensor, rows) of output ``shard_id``"""
        local = self.local_sizes[shard_id]
        return sum(self.local_sizes[:shard_id]), ps.get_tp_rank() * local, local

    def full_shape(self, param: nn.Parameter | None, shard_id: int) -> tuple[int, ...]:
        """Checkpoint shape of fused output ``shard_id`` (of the weight, or of ``param`` a bias)."""
        rows = self.output_sizes[shard_id]
        return (rows,) if param is not None and param is self.bias else (rows, self.input_size)

    def shard_window(self, shard_id: int) -> tuple[slice, slice | None]:
        """(rows, columns or None for all) of the full weight ``shard_id`` that this rank holds;
        a padded shard's window stops at the checkpoint's width (and may be empty)."""
        _, start, rows = self.shard_rows(shard_id)
        cols = None
        if self.local_input != self.input_size:
            window = slice(self.input_start, self.input_start + self.local_input)
            cols = _clip(window, self.input_size)
        return _clip(slice(start, start + rows), self.output_sizes[shard_id]), cols

    def read_shard(self, loaded: LazyTensor, shard_id: int, param: nn.Parameter) -> torch.Tensor:
        """This rank's part of the full weight ``shard_id`` as a float tensor (shape-checked),
        zero-padded to the shard's shape when the layer pads."""
        check_shape(loaded, self.full_shape(None, shard_id), _name(param))
        rows, cols = self.shard_window(shard_id)
        local_rows = self.shard_rows(shard_id)[2]
        if rows.stop == rows.start or (cols is not None and cols.stop == cols.start):
            return torch.zeros(local_rows, self.local_input)  # a rank wholly in the padding
        if cols is None:
            part = loaded[rows]
        elif rows.start == 0 and rows.stop == loaded.shape[0]:
            part = loaded[:, cols]
        else:
            part = loaded[rows, cols]
        # (rows read, columns read) -> (local rows, local_input), zeros past the width.
        return F.pad(part, (0, self.local_input - part.shape[1], 0, local_rows - part.shape[0]))

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: int = 0) -> None:
        """Load fused output ``shard_id`` of the weight (via the method) or of the bias."""
        if param is self.bias:
            check_shape(loaded, self.full_shape(param, shard_id), _name(param))
            offset, start, rows = self.shard_rows(shard_id)
            window = _clip(slice(start, start + rows), self.output_sizes[shard_id])
            values = loaded[window] if window.stop > window.start else torch.zeros(0)
            _copy(param[offset : offset + rows], F.pad(values, (0, rows - values.shape[0])))
        else:
            if self.is_padded and hasattr(loaded, "read_packed"):
                loaded = _FloatView(loaded)
            self.quant_method.weight_loader(self, param, loaded, shard_id or 0)

    def process_weights_after_loading(self) -> None:
        """Let the method fuse or repack the loaded shards (called once by the loader)."""
        self.quant_method.process_weights_after_loading(self)


def _name(param: nn.Parameter) -> str:
    return getattr(param, "checkpoint_name", "?")


class ColumnParallelLinear(LinearBase):
    """``y = x W^T + b`` with W split by output rows; each rank returns its slice of ``y``.

    Args:
        input_size: width of x.
        output_sizes: widths of the fused outputs, e.g. ``[inter, inter]`` for gate/up; each is
            split over the TP ranks separately so a rank holds ``[gate_r; up_r]``.
        bias: whether the projection has a bias.
        local_sizes: rows of each output this rank holds (default: an even split).
        quant_config: the quantization (default: the active ``quantization_scope``'s).
        pad: zero-pad an output width the TP size does not divide (exact for a gated MLP's
            gate/up rows, see the module docstring) instead of refusing it.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        local_sizes: Sequence[int] | None = None,
        quant_config: QuantizationConfig | None = None,
        pad: bool = False,
    ):
        tp = ps.get_tp_size()
        if local_sizes is None:
            for size in output_sizes:
                if size % tp and not pad:
                    raise ModelLoadError(f"output width {size} does not divide by TP size {tp}")
            multiple = _pad_multiple(quant_config)
            local_sizes = [padded_shard(s, tp, multiple) for s in output_sizes]
            self.is_padded = any(
                n * tp != s for n, s in zip(local_sizes, output_sizes, strict=True)
            )
        self.bias: nn.Parameter | None = None
        super().__init__(input_size, output_sizes, input_size, local_sizes, 0, quant_config)
        if bias:
            self.bias = _param((sum(self.local_sizes),), self.weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, input_size) -> (tokens, sum(output_sizes) / tp)."""
        y = self.quant_method.apply(self, x, self.bias)
        return y if self.lora is None else self.lora(x, y)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel linear of several fused outputs (gate/up), under vLLM's name.

    The same layer as :class:`ColumnParallelLinear` with more than one entry in ``output_sizes``.
    """


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection, split by heads; KV heads replicated when TP > KV heads.

    With 8 query heads, 2 KV heads and TP 4, rank r holds query heads {2r, 2r+1} and KV head r // 2:
    ranks 0,1 share KV head 0 and ranks 2,3 share KV head 1, so each rank computes attention
    locally.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_heads: int,
        total_kv_heads: int,
        bias: bool,
        quant_config: QuantizationConfig | None = None,
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
            quant_config=quant_config,
        )

    def shard_rows(self, shard_id: int) -> tuple[int, int, int]:
        """Query shard 0 splits by TP rank; k/v shards 1 and 2 by ``tp_rank // kv_replicas``."""
        local = self.local_sizes[shard_id]
        index = ps.get_tp_rank() if shard_id == 0 else ps.get_tp_rank() // self.kv_replicas
        return sum(self.local_sizes[:shard_id]), index * local, local


class RowParallelLinear(LinearBase):
    """``y = x W^T + b`` with W split by input columns; partial sums all-reduced over TP.

    The input arrives already split (the output of a column-parallel layer), so the only
    communication is the all-reduce of the (tokens, output_size) result.

    Args:
        input_size: full width of x.
        output_size: width of y.
        bias: whether the projection has a bias (added once, after the all-reduce).
        quant_config: the quantization (default: the active ``quantization_scope``'s).
        pad: zero-pad an input width the TP size does not divide (a gated MLP's down columns)
            instead of refusing it.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        pad: bool = False,
    ):
        tp = ps.get_tp_size()
        if input_size % tp and not pad:
            raise ModelLoadError(f"input width {input_size} does not divide by TP size {tp}")
        self.output_size = output_size
        local_input = padded_shard(input_size, tp, _pad_multiple(quant_config))
        self.is_padded = local_input * tp != input_size
        self.bias: nn.Parameter | None = None
        super().__init__(
            input_size,
            [output_size],
            local_input,
            [output_size],
            ps.get_tp_rank() * local_input,
            quant_config,
        )
        if bias:
            self.bias = _param((output_size,), load_replicated)

    def shard_rows(self, shard_id: int) -> tuple[int, int, int]:
        """Every rank holds all output rows."""
        return 0, 0, self.output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, input_size / tp) -> (tokens, output_size), summed over the TP group."""
        partial = self.quant_method.apply(self, x)
        if self.lora is not None:  # a partial sum too: one all-reduce covers both
            partial = self.lora(x, partial)
        y = tp_all_reduce(partial)
        # The bias is added once, after the reduction, not once per rank.
        return y + self.bias if self.bias is not None else y
