"""Weight-only quantized linears: int8 / int4 on the fly, and already-packed sources (GGUF).

Loading is shard by shard and tensor by tensor: the loader hands the layer one checkpoint tensor
at a time, the layer cuts this rank's slice, and this method quantizes the slice at once (or, for
a source whose ``read_packed`` gives blocks, converts them without a float round trip). So a
rank holds at most one full-precision slice at a time, never a float copy of its shard.

Each fused output (q, k, v; gate, up) becomes one part; after loading the parts are stacked
along N into one weight when their forms agree (always, for ``--quantization``) and kept as
separate matmuls when they do not (a GGUF Q4_K_M layer whose v is Q6_K and q, k are Q4_K).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mgpu.errors import ModelLoadError
from mgpu.layers.quantization.base import LinearMethodBase, QuantizationConfig
from mgpu.layers.quantization.weights import (
    DenseWeight,
    Int4Weight,
    PackedWeight,
    concat_rows,
    quantize_int4,
    quantize_int8,
)
from mgpu.memory import int4_group_for

if TYPE_CHECKING:
    from mgpu.layers.linear import LazyTensor, LinearBase

logger = logging.getLogger(__name__)

#: Default columns per int4 scale/zero pair (the common choice of AWQ, GPTQ and gpt-fast).
DEFAULT_INT4_GROUP_SIZE = 128


@dataclass(frozen=True)
class WeightOnlyConfig(QuantizationConfig):
    """Weight-only quantization of every parallel linear (embeddings and LM head stay float).

    Args:
        name: ``int8``, ``int4``, or ``gguf`` (keep a GGUF file's own types, see ``models.gguf``).
        bits: 8 or 4 for float sources quantized while loading; None keeps them float.
        group_size: int4 columns per scale/zero pair (int8 has one scale per output row).
        use_kernel: run PyTorch's fused kernels where they fit (False: always dequantise).
    """

    name: str = "int4"
    bits: int | None = 4
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    use_kernel: bool = True

    def get_linear_method(self, layer: LinearBase) -> LinearMethodBase:
        """A :class:`WeightOnlyLinearMethod` for every linear."""
        return WeightOnlyLinearMethod(self)

    def quantize(self, w: torch.Tensor, group_size: int) -> PackedWeight:
        """A float (N, K) shard in this config's form: int8, int4 or (bits None) dense.

        Args:
            w: the shard.
            group_size: int4 columns per scale/zero pair (already fitted to K).
        """
        if self.bits == 8:
            return quantize_int8(w)
        if self.bits == 4:
            return quantize_int4(w, group_size)
        return DenseWeight(w.to(torch.get_default_dtype()))

    def finalize(self, part: PackedWeight, dtype: torch.dtype) -> None:
        """Repack ``part`` for the kernel once its layer is loaded (see ``Int4Weight.finalize``).

        Args:
            part: a loaded weight.
            dtype: the model's activation dtype.
        """
        if isinstance(part, Int4Weight):
            part.finalize(self.use_kernel, dtype)
        else:
            part.finalize(self.use_kernel)


class WeightOnlyLinearMethod(LinearMethodBase):
    """Stores a linear's shard as int8/int4 (or a GGUF source's converted blocks)."""

    def __init__(self, config: WeightOnlyConfig):
        self.config = config

    def create_weights(self, layer: LinearBase) -> None:
        """A storage-free ``weight`` placeholder of the shard's shape: the loader finds the
        checkpoint names through it, and the packed tensors replace it after loading."""
        shape = (sum(layer.local_sizes), layer.local_input)
        weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
        weight.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
        layer.weight = weight
        # The device and dtype of the model being built (set by the runner's scopes).
        layer.quant_device = torch.empty(0).device
        layer.quant_dtype = torch.get_default_dtype()
        layer.quant_parts: dict[int, PackedWeight] = {}
        layer.packed_parts: list[PackedWeight] = []
        layer.quant_group_size = int4_group_for(layer.local_input, self.config.group_size)
        if layer.quant_group_size != self.config.group_size and self.config.bits == 4:
            logger.info(
                "int4 group size %d does not divide this rank's %d input columns; using %d",
                self.config.group_size,
                layer.local_input,
                layer.quant_group_size,
            )

    def weight_loader(
        self, layer: LinearBase, param: nn.Parameter, loaded: LazyTensor, shard_id: int
    ) -> None:
        """Quantize (or convert) this rank's slice of output ``shard_id`` as it arrives."""
        read_packed = getattr(loaded, "read_packed", None)
        if read_packed is not None:
            from mgpu.layers.linear import check_shape

            check_shape(loaded, layer.full_shape(None, shard_id), param_name(param))
            rows, cols = layer.shard_window(shard_id)
            part = read_packed(rows, cols)
            if isinstance(part, torch.Tensor):
                group = int4_group_for(part.shape[1], layer.quant_group_size)
                part = self.config.quantize(part, group)
        else:
            with torch.no_grad():
                part = self.config.quantize(
                    layer.read_shard(loaded, shard_id, param), layer.quant_group_size
                )
        layer.quant_parts[shard_id] = part_to_device(part, layer.quant_device)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Stack the parts, repack for the kernel and register the packed tensors."""
        missing = [i for i in range(len(layer.local_sizes)) if i not in layer.quant_parts]
        if missing:
            raise ModelLoadError(
                f"{type(layer).__name__}: fused output(s) {missing} were never loaded"
            )
        parts = [layer.quant_parts[i] for i in range(len(layer.local_sizes))]
        fused = concat_rows(parts)
        layer.packed_parts = [fused] if fused is not None else parts
        layer.quant_parts = {}
        del layer.weight
        for i, part in enumerate(layer.packed_parts):
            self.config.finalize(part, layer.quant_dtype)
            prefix = "" if len(layer.packed_parts) == 1 else f"part{i}_"
            for name, tensor in part.tensors().items():
                layer.register_parameter(prefix + name, nn.Parameter(tensor, requires_grad=False))

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(T, K_local) -> (T, N_local) through each part's kernel or dequantising path."""
        use_kernel = self.config.use_kernel
        if len(layer.packed_parts) == 1:
            y = layer.packed_parts[0].matmul(x, use_kernel)
        else:
            y = torch.cat([p.matmul(x, use_kernel) for p in layer.packed_parts], dim=-1)
        return y + bias if bias is not None else y


def param_name(param: nn.Parameter) -> str:
    """The checkpoint name the loader gave ``param`` (for messages)."""
    return getattr(param, "checkpoint_name", "?")


def part_to_device(part: PackedWeight, device: torch.device) -> PackedWeight:
    """``part`` with its tensors on ``device`` (in place; CPU parts are returned as they are)."""
    if device.type == "cpu":
        return part
    for name, tensor in vars(part).items():
        if isinstance(tensor, torch.Tensor):
            setattr(part, name, tensor.to(device))
    return part
