"""The one memory formula (STYLE.md convention 10).

The planner, the engine's KV-cache allocator and the monitor all size memory with these functions,
so
a plan and a running server never disagree about what fits.

- weights per rank = sum over the rank's parameters of (elements x bits per weight / 8)
- KV bytes per token per rank = 2 x layers on the rank x KV heads on the rank x head_dim x bytes

Matrices (projections, embedding, LM head) are counted at ``bits_per_weight`` (which for quantized
formats includes the per-block scales, e.g. 4.5 bits for GGUF q4_0); the small vectors (norm
weights,
biases) stay at ``vector_bytes`` per element, as every engine keeps them unquantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mgpu.config import ModelConfig


def local_kv_heads(model: ModelConfig, tp_size: int) -> int:
    """KV heads held by one TP rank: an even share, or one replicated head when TP > KV heads."""
    return max(1, model.num_key_value_heads // tp_size)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Vocabulary padded up to a multiple of the TP size so every rank holds an equal shard."""
    return math.ceil(vocab_size / tp_size) * tp_size


@dataclass(frozen=True)
class RankWeights:
    """Parameter counts on one rank, split into sharded matrices and replicated vectors."""

    matrix_elements: int
    vector_elements: int
    replicated_elements: int

    def bytes(self, bits_per_weight: float, vector_bytes: int = 2) -> int:
        """Bytes of the rank's weights at the given precision."""
        return int(self.matrix_elements * bits_per_weight / 8) + self.vector_elements * vector_bytes


def rank_weights(
    model: ModelConfig,
    tp_size: int = 1,
    layer_range: tuple[int, int] | None = None,
    is_first_stage: bool = True,
    is_last_stage: bool = True,
) -> RankWeights:
    """Count the parameters one rank holds.

    Args:
        model: the architecture.
        tp_size: tensor-parallel size.
        layer_range: ``[start, end)`` decoder layers on this pipeline stage (all layers if None).
        is_first_stage: the stage holds the token embedding.
        is_last_stage: the stage holds the final norm and the LM head.

    ``replicated_elements`` counts what every TP rank holds in full (norms, replicated KV heads),
    the
    part that does not shrink with TP.
    """
    h, d = model.hidden_size, model.head_dim
    start, end = layer_range or (0, model.num_hidden_layers)
    n_layers = end - start
    q_local = model.num_attention_heads // tp_size
    kv_local = local_kv_heads(model, tp_size)
    inter_local = model.intermediate_size // tp_size
    experts = max(1, model.num_local_experts)

    attn = h * q_local * d + 2 * h * kv_local * d + q_local * d * h
    mlp = 3 * h * inter_local * experts + (h * model.num_local_experts)
    layer_vectors = 2 * h
    if model.attention_bias:
        layer_vectors += (q_local + 2 * kv_local) * d
    matrices = n_layers * (attn + mlp)
    vectors = n_layers * layer_vectors
    # KV heads replicated beyond their share: each rank holds a full copy of its head.
    replicated_kv = 0
    if tp_size > model.num_key_value_heads:
        replicated_kv = n_layers * 2 * h * kv_local * d
    replicated = vectors + replicated_kv

    vocab_local = padded_vocab_size(model.vocab_size, tp_size) // tp_size
    if is_first_stage:
        matrices += vocab_local * h
    if is_last_stage:
        vectors += h
        replicated += h
        shares_embedding = model.tie_word_embeddings and is_first_stage
        if not shares_embedding:
            matrices += vocab_local * h
    return RankWeights(matrices, vectors, replicated)


def weight_bytes_per_rank(
    model: ModelConfig,
    bits_per_weight: float,
    tp_size: int = 1,
    layer_range: tuple[int, int] | None = None,
    is_first_stage: bool = True,
    is_last_stage: bool = True,
    vector_bytes: int = 2,
) -> int:
    """Bytes of weights on one rank (see :func:`rank_weights`)."""
    counts = rank_weights(model, tp_size, layer_range, is_first_stage, is_last_stage)
    return counts.bytes(bits_per_weight, vector_bytes)


def kv_bytes_per_token(
    model: ModelConfig, num_layers: int, tp_size: int = 1, bytes_per_element: float = 2
) -> int:
    """KV-cache bytes one token occupies on one rank holding ``num_layers`` layers."""
    return int(2 * num_layers * local_kv_heads(model, tp_size) * model.head_dim * bytes_per_element)
