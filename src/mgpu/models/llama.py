"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5) and the attention and MLP blocks other
families reuse, built from tensor-parallel layers.

One class covers the family: the differences are config fields (GQA ratio, QKV bias, tied
embeddings, RoPE scaling, sliding window). Per decoder layer and rank (tp = tensor-parallel size,
h = hidden, d = head_dim)::

    x (T, h) -> RMSNorm -> qkv_proj [column]  -> (T, (H + 2 Hkv) d / tp) -> RoPE -> paged attention
             -> o_proj [row, all-reduce] -> + x -> RMSNorm -> gate_up_proj [column] -> SwiGLU
             -> down_proj [row, all-reduce] -> + residual

A mixture-of-experts layer replaces the MLP by :class:`~mgpu.layers.moe.FusedMoE` (one
all-reduce too); Qwen3 adds a per-head RMSNorm on q and k before RoPE.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mgpu.config import ModelConfig
from mgpu.layers.activation import gated_activation
from mgpu.layers.attention import AttentionMetadata, PagedAttention
from mgpu.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mgpu.layers.moe import FusedMoE
from mgpu.layers.norm import RMSNorm
from mgpu.layers.rotary import apply_rotary
from mgpu.models.base import CausalLM, Rope


class LlamaAttention(nn.Module):
    """Self-attention with this rank's share of the heads.

    Args:
        config: the architecture (its window, scale and soft-cap apply per layer).
        layer: global index of the layer.
        qk_norm: the per-head norm applied to q and k before RoPE (Qwen3, Gemma 3), if any.
    """

    def __init__(self, config: ModelConfig, layer: int, qk_norm: type[RMSNorm] | None = None):
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            d,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size)
        scalar = config.query_pre_attn_scalar
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            d,
            config.layer_window(layer),
            scale=None if scalar is None else scalar**-0.5,
            softcap=config.attn_logit_softcapping,
        )
        self.q_norm = qk_norm(d, config.rms_norm_eps) if qk_norm else None
        self.k_norm = qk_norm(d, config.rms_norm_eps) if qk_norm else None
        self.head_dim = d

    def forward(self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T, h) -> (T, h)."""
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)  # (T, (heads + 2 kv_heads) d) laid out as [q | k | v]
        # Rotate q and k together, written back into qkv so that k and v stay side by side for
        # the cache: fewer, larger kernels than rotating q and k apart.
        qk_view = qkv[:, : self.q_size + self.kv_size].view(
            t, self.num_heads + self.num_kv_heads, d
        )
        qk = qk_view
        if self.q_norm is not None and self.k_norm is not None:
            q_normed, _ = self.q_norm(qk[:, : self.num_heads])  # (T, heads, d)
            k_normed, _ = self.k_norm(qk[:, self.num_heads :])  # (T, kv_heads, d)
            qk = torch.cat([q_normed, k_normed], dim=1)
        qk_view.copy_(apply_rotary(qk, rope))
        q = qkv[:, : self.q_size].view(t, self.num_heads, d)  # (T, heads, d)
        kv = qkv[:, self.q_size :].view(t, 2, self.num_kv_heads, d)  # (T, 2, kv_heads, d)
        return self.o_proj(self.attn(q, kv, meta))  # attn: (T, heads * d)


class LlamaMLP(nn.Module):
    """Gated MLP (SwiGLU, or GeGLU for Gemma): fused gate/up (column) and down (row-parallel).

    An intermediate size the TP size does not divide is zero-padded in both layers (gate/up rows
    and down columns past it are zeros), which leaves the output exactly the same.
    """

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [inter, inter], config.mlp_bias, pad=True
        )
        self.down_proj = RowParallelLinear(inter, config.hidden_size, config.mlp_bias, pad=True)
        self.act = gated_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, h) -> (T, h)."""
        return self.down_proj(self.act(self.gate_up_proj(x)))


def make_mlp(
    config: ModelConfig, layer: int, expert_names: tuple[str, str, str]
) -> LlamaMLP | FusedMoE:
    """The MLP of decoder layer ``layer``: experts where the config puts them, else dense.

    Args:
        config: the architecture.
        layer: global index of the layer.
        expert_names: checkpoint names of an expert's gate, up and down projections.
    """
    if not config.is_moe_layer(layer):
        return LlamaMLP(config, config.dense_intermediate_size or None)
    return FusedMoE(
        config.hidden_size,
        config.intermediate_size,
        config.num_local_experts,
        config.num_experts_per_tok,
        config.norm_topk_prob,
        gated_activation(config.hidden_act),
        expert_names,
    )


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer with the residual carried separately (fused into the next norm).

    The forward is every family's: norm, attention, :meth:`attention_out` (the residual add and
    the norm before the MLP), MLP, :meth:`mlp_out`. A family with other norms around the two
    blocks (Gemma's sandwich) overrides those two methods and nothing else.

    Args:
        config: the architecture.
        layer: global index of the layer.
        qk_norm: per-head q/k norm of the attention (Qwen3, Gemma 3), if any.
        mlp_name: attribute (and checkpoint) name of the MLP: ``mlp``, or Mixtral's
            ``block_sparse_moe``.
        expert_names: checkpoint names of an expert's gate, up and down projections.
        norm_class: the layer norms' class (Gemma's adds one to its weight).
    """

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        qk_norm: type[RMSNorm] | None = None,
        mlp_name: str = "mlp",
        expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        norm_class: type[RMSNorm] = RMSNorm,
    ):
        super().__init__()
        self.attention_type = config.attention_type(layer)
        self.self_attn = LlamaAttention(config, layer, qk_norm)
        self.mlp_name = mlp_name
        self.add_module(mlp_name, make_mlp(config, layer, expert_names))
        self.input_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (layer output before its residual add, running residual), both (T, h)."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.attention_out(self.self_attn(rope, h, meta), residual)
        return self.mlp_out(getattr(self, self.mlp_name)(h)), residual

    def attention_out(
        self, h: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output (T, h) -> (MLP input, running residual): the pre-MLP norm, fused with
        the residual add."""
        return self.post_attention_layernorm(h, residual)

    def mlp_out(self, h: torch.Tensor) -> torch.Tensor:
        """MLP output (T, h) -> layer output (T, h): as it is."""
        return h


class LlamaForCausalLM(CausalLM):
    """Llama 2/3.x, Mistral and Qwen2/2.5 (see :class:`~mgpu.models.base.CausalLM`)."""

    architectures: ClassVar[tuple[str, ...]] = (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
    )

    @classmethod
    def make_layer(cls, config: ModelConfig, layer: int) -> nn.Module:
        """A pre-norm Llama decoder layer."""
        return LlamaDecoderLayer(config, layer)
