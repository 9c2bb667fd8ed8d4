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
from mgpu.layers.norm import GemmaRMSNorm, RMSNorm
from mgpu.models.base import CausalLM
from mgpu.models.llama import LlamaDecoderLayer


class GemmaDecoderLayer(LlamaDecoderLayer):
    """A Gemma 2/3 decoder layer: the Llama layer with (1 + weight) norms and a norm after each
    block as well as before it.

    Its checkpoints name the norm after attention ``post_attention_layernorm`` (Llama's name for
    the norm before the MLP), the one before the MLP ``pre_feedforward_layernorm``.

    Args:
        config: the architecture.
        layer: global index of the layer.
        qk_norm: per-head q/k norm (Gemma 3), if any.
    """

    def __init__(self, config: ModelConfig, layer: int, qk_norm: type[RMSNorm] | None = None):
        super().__init__(config, layer, qk_norm, norm_class=GemmaRMSNorm)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def attention_out(
        self, h: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm the attention output on its own, then the pre-MLP norm with the residual add."""
        h, _ = self.post_attention_layernorm(h)
        return self.pre_feedforward_layernorm(h, residual)

    def mlp_out(self, h: torch.Tensor) -> torch.Tensor:
        """Norm the MLP output (T, h) before its residual add."""
        h, _ = self.post_feedforward_layernorm(h)
        return h


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
