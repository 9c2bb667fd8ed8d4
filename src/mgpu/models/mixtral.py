"""Mixtral: the Mistral layer with a mixture of SwiGLU experts, top-k renormalised routing.

Its checkpoints name the MoE block ``block_sparse_moe`` and an expert's gate, up and down
projections ``w1``, ``w3`` and ``w2``; everything else is Mistral's.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from mgpu.config import ModelConfig
from mgpu.models.base import CausalLM
from mgpu.models.llama import LlamaDecoderLayer


class MixtralForCausalLM(CausalLM):
    """Mixtral 8x7B / 8x22B (see :class:`~mgpu.layers.moe.FusedMoE` for the split)."""

    architectures: ClassVar[tuple[str, ...]] = ("MixtralForCausalLM",)

    @classmethod
    def make_layer(cls, config: ModelConfig, layer: int) -> nn.Module:
        """A Mistral decoder layer whose MLP is experts."""
        return LlamaDecoderLayer(
            config, layer, mlp_name="block_sparse_moe", expert_names=("w1", "w3", "w2")
        )
