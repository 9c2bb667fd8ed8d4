"""The quantization seam of the parallel linears: a method object per layer, as vLLM's.

A parallel linear (``layers.linear``) owns the sharding geometry: which rows and columns of each
full checkpoint tensor this rank keeps. Its :class:`LinearMethodBase` owns the weight's storage
and its matmul:

- ``create_weights(layer)`` registers the layer's ``weight`` parameter with a ``weight_loader``;
- ``weight_loader(layer, param, loaded, shard_id)`` turns this rank's slice of a checkpoint tensor
  into that storage (a copy, a quantization, or a conversion of already-packed blocks);
- ``process_weights_after_loading(layer)`` finishes what needs every shard (fusing, repacking);
- ``apply(layer, x, bias)`` computes ``x W^T + b`` for this rank's shard.

Tensor and pipeline parallelism never see the method: the layer slices, the method stores.
A :class:`QuantizationConfig` hands each linear its method. The model runner builds the model
inside :func:`quantization_scope`, so model files need no quantization argument.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mgpu.layers.linear import LazyTensor, LinearBase


class LinearMethodBase(ABC):
    """Storage and matmul of one parallel linear's weight (see the module docstring)."""

    @abstractmethod
    def create_weights(self, layer: LinearBase) -> None:
        """Register ``layer.weight`` (a parameter with a ``weight_loader``) for this rank."""

    @abstractmethod
    def weight_loader(
        self, layer: LinearBase, param: nn.Parameter, loaded: LazyTensor, shard_id: int
    ) -> None:
        """Store this rank's slice of fused output ``shard_id`` of the checkpoint tensor."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:  # noqa: B027
        """Finish the layer once every shard is loaded (no-op unless the method packs)."""

    @abstractmethod
    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(tokens, local input) -> (tokens, local output): ``x W^T + b`` on this rank's shard."""


class QuantizationConfig(ABC):
    """Chooses the :class:`LinearMethodBase` of every parallel linear of a model."""

    #: Name shown in the startup table and accepted by ``--quantization``.
    name: str = ""

    @abstractmethod
    def get_linear_method(self, layer: LinearBase) -> LinearMethodBase:
        """The method for ``layer`` (called from the layer's constructor)."""


_current: list[QuantizationConfig | None] = [None]


@contextlib.contextmanager
def quantization_scope(config: QuantizationConfig | None) -> Iterator[None]:
    """Parallel linears constructed inside this block take their method from ``config``.

    Args:
        config: the model's quantization, or None for unquantized weights.
    """
    previous = _current[0]
    _current[0] = config
    try:
        yield
    finally:
        _current[0] = previous


def current_quant_config() -> QuantizationConfig | None:
    """The config of the innermost :func:`quantization_scope` (None outside any)."""
    return _current[0]
