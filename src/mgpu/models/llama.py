"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5) built from tensor-parallel layers.

One class covers the family: the differences are config fields (GQA ratio, QKV bias, tied
embeddings,
RoPE scaling, sliding window). A pipeline stage builds only its layer range (STYLE.md convention 8):
the first stage embeds tokens, the last applies the final norm and the LM head.

Per decoder layer and rank (tp = tensor-parallel size, h = hidden, d = head_dim)::

    x (T, h) -> RMSNorm -> qkv_proj [column]  -> (T, (H + 2 Hkv) d / tp) -> RoPE -> paged attention
             -> o_proj [row, all-reduce] -> + x -> RMSNorm -> gate_up_proj [column] -> SwiGLU
             -> down_proj [row, all-reduce] -> + residual
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mgpu.config import ModelConfig
from mgpu.layers.activation import silu_and_mul
from mgpu.layers.attention import AttentionMetadata, PagedAttention
from mgpu.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mgpu.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mgpu.layers.norm import RMSNorm
from mgpu.layers.rotary import RotaryEmbedding, apply_rotary

#: (cos, sin) of RoPE for the step's tokens, each (T, 1, head_dim), shared by all layers.
Rope = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    """Self-attention with this rank's share of the heads."""

    def __init__(self, config: ModelConfig):
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
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, config.sliding_window)
        self.head_dim = d

    def forward(self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T, h) -> (T, h)."""
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)  # (T, (heads + 2 kv_heads) d) laid out as [q | k | v]
        # Rotate q and k together, written back into qkv so that k and v stay side by side for
        # the cache: fewer, larger kernels than rotating q and k apart.
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, d)
        qk.copy_(apply_rotary(qk, rope))
        q = qkv[:, : self.q_size].view(t, self.num_heads, d)  # (T, heads, d)
        kv = qkv[:, self.q_size :].view(t, 2, self.num_kv_heads, d)  # (T, 2, kv_heads, d)
        return self.o_proj(self.attn(q, kv, meta))  # attn: (T, heads * d)


class LlamaMLP(nn.Module):
    """SwiGLU MLP: fused gate/up (column-parallel) and down (row-parallel)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [inter, inter], config.mlp_bias
        )
        self.down_proj = RowParallelLinear(inter, config.hidden_size, config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, h) -> (T, h)."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer with the residual carried separately (fused into the next norm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (layer output before its residual add, running residual), both (T, h)."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """A pipeline stage of a Llama-family causal LM on one rank.

    Args:
        config: the architecture.
        layer_range: ``[start, end)`` decoder layers this stage holds (all when None).
        is_first_stage: holds the embedding and takes token ids.
        is_last_stage: holds the final norm and the LM head and produces logits.
    """

    #: HF checkpoint names fused into one local parameter: local name -> [(HF name, shard id)].
    packed_modules: ClassVar[dict[str, list[tuple[str, int]]]] = {
        "qkv_proj": [("q_proj", 0), ("k_proj", 1), ("v_proj", 2)],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }

    def __init__(
        self,
        config: ModelConfig,
        layer_range: tuple[int, int] | None = None,
        is_first_stage: bool = True,
        is_last_stage: bool = True,
    ):
        super().__init__()
        self.config = config
        self.start_layer, self.end_layer = layer_range or (0, config.num_hidden_layers)
        self.is_first_stage, self.is_last_stage = is_first_stage, is_last_stage
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            if is_first_stage
            else None
        )
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(self.start_layer, self.end_layer)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if is_last_stage else None
        self.lm_head = None
        if is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run this stage's layers.

        Args:
            input_ids: (T,) token ids (used by the first stage).
            positions: (T,) absolute positions.
            meta: attention metadata of the step.
            hidden, residual: (T, h) from the previous stage (later stages only).

        Returns:
            (hidden, residual): on the last stage ``hidden`` is final-normed and residual is None.
        """
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(input_ids)  # (T, h)
        assert hidden is not None, "a later pipeline stage needs the previous stage's hidden states"
        rope = self.rotary_emb(positions, hidden.dtype)
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual, meta)
        if self.norm is not None:
            hidden, _ = self.norm(hidden, residual)
            residual = None
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, h) final hidden states -> (N, vocab) float32 logits on TP rank 0, None elsewhere."""
        assert self.lm_head is not None, "only the last pipeline stage computes logits"
        return self.lm_head(hidden)

    def checkpoint_names(self) -> dict[str, tuple[nn.Parameter, int | None]]:
        """Every HF checkpoint tensor this rank needs: HF name -> (local parameter, shard id).

        A tied LM head on the embedding's stage is the embedding parameter itself, so
        ``named_parameters`` lists it once; on a later stage it reads ``model.embed_tokens.weight``.
        """
        names: dict[str, tuple[nn.Parameter, int | None]] = {}
        for local_name, param in self.named_parameters():
            hf_name = self._hf_name(local_name)
            module_name = hf_name.rsplit(".", 2)[-2]
            for hf_part, shard in self.packed_modules.get(module_name, [(module_name, None)]):
                names[hf_name.replace(f".{module_name}.", f".{hf_part}.")] = (param, shard)
        return names

    def _hf_name(self, local_name: str) -> str:
        if local_name.startswith("lm_head."):
            if self.config.tie_word_embeddings and self.embed_tokens is None:
                return "model.embed_tokens.weight"
            return local_name
        if local_name.startswith("layers."):
            _, idx, rest = local_name.split(".", 2)
            return f"model.layers.{int(idx) + self.start_layer}.{rest}"
        return f"model.{local_name}"


def all_checkpoint_names(config: ModelConfig) -> set[str]:
    """Every tensor name a complete HF checkpoint of ``config`` may hold (for strict loading)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    for proj in ("q_proj", "k_proj", "v_proj"):
        per_layer.append(f"self_attn.{proj}.weight")
        if config.attention_bias:
            per_layer.append(f"self_attn.{proj}.bias")
    if config.mlp_bias:
        per_layer += [f"mlp.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")]
    for i in range(config.num_hidden_layers):
        names.update(f"model.layers.{i}.{n}" for n in per_layer)
    return names
