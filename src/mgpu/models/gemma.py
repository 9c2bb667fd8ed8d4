"""Gemma 2 and Gemma 3 (text): the Llama attention and gated MLP with Gemma's changes.

- embeddings scaled by sqrt(hidden) (in the activation dtype, as transformers does);
- four (1 + weight) RMSNorms per layer, before and after attention and the MLP;
- GeGLU (tanh-approximated GELU) instead of SwiGLU;
- scores scaled by ``query_pre_attn_scalar ** -0.5``;
- a sliding window on some layers (Gemma 2: every other one; Gemma 3: five of six), global
  attention on the rest: each layer takes the mask of its kind (see ``CausalLM.forward``);
- Gemma 2: attention scores and final logits soft-capped, ``cap * tanh(x / cap)``;
- Gemma 3: a per-head (1 + weight) RMSNorm on q and k, and its own RoPE base on sliding layers.

Per decoder layer::

    x -> norm -> attention -> norm -> + x -> norm -> GeGLU MLP -> norm -> + residual
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mgpu.config import ModelConfig
from mgpu.layers.attention import AttentionMetadata
from mgpu.layers.norm import GemmaRMSNorm, RMSNorm
from mgpu.models.base import CausalLM, Rope
from mgpu.models.llama import LlamaAttention, LlamaMLP


class GemmaDecoderLayer(nn.Module):
    """A Gemma 2/3 decoder layer, the residual carried separately like the Llama layer's.

    Args:
        config: the architecture.
        layer: global index of the layer.
        qk_norm: per-head q/k norm (Gemma 3), if any.
    """

    def __init__(self, config: ModelConfig, layer: int, qk_norm: type[RMSNorm] | None = None):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.attention_type = config.attention_type(layer)
        self.self_attn = LlamaAttention(config, layer, qk_norm)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (layer output before its residual add, running residual), both (T, h)."""
        h, residual = self.input_layernorm(x, residual)
        h, _ = self.post_attention_layernorm(self.self_attn(rope, h, meta))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        h, _ = self.post_feedforward_layernorm(self.mlp(h))
        return h, residual


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2 (see :class:`~mgpu.models.base.CausalLM`)."""

    architectures: ClassVar[tuple[str, ...]] = ("Gemma2ForCausalLM",)
    norm_class: ClassVar[type[RMSNorm]] = GemmaRMSNorm
    #: Per-head q/k norm of the attention (Gemma 3 has one).
    qk_norm: ClassVar[type[RMSNorm] | None] = None

    @classmethod
    def make_layer(cls, config: ModelConfig, layer: int) -> nn.Module:
        """A Gemma decoder layer."""
        return GemmaDecoderLayer(config, layer, cls.qk_norm)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, h), scaled by sqrt(hidden) rounded to the activation dtype."""
        hidden = super().embed(input_ids)
        return hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text models (``Gemma3ForCausalLM``: the 1B, or the text tower of larger ones)."""

    architectures: ClassVar[tuple[str, ...]] = ("Gemma3ForCausalLM",)
    qk_norm: ClassVar[type[RMSNorm] | None] = GemmaRMSNorm
