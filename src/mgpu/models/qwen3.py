"""Qwen3 and Qwen3-MoE: the Llama layer with a per-head RMSNorm on q and k, no QKV bias.

Qwen3-MoE replaces the MLP of its sparse layers (all but ``mlp_only_layers``, every
``decoder_sparse_step``-th) by experts with top-k routing, renormalised when the config's
``norm_topk_prob`` says so; its experts' checkpoint names are ``mlp.experts.{e}.gate_proj`` etc.
The layer builder reads which layers are sparse from the config, so one class serves both.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from mgpu.config import ModelConfig
from mgpu.layers.norm import RMSNorm
from mgpu.models.base import CausalLM
from mgpu.models.llama import LlamaDecoderLayer


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 dense and mixture-of-experts models (see :class:`~mgpu.models.base.CausalLM`)."""

    architectures: ClassVar[tuple[str, ...]] = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")

    @classmethod
    def make_layer(cls, config: ModelConfig, layer: int) -> nn.Module:
        """A Llama decoder layer with q/k norms (and experts where the config has them)."""
        return LlamaDecoderLayer(config, layer, qk_norm=RMSNorm)
