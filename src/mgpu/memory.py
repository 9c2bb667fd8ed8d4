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

What an mgpu rank holds once loaded, which its report measures, is :func:`predicted_weight_bytes`:
each projection at its :class:`LinearStorage` (int8/int4 codes with their scales, as
``layers.quantization`` stores them), the embedding, LM head, routers and vectors in the model
dtype. The startup table, ``GET /v1/layout`` and ``--dry-run`` print it beside the measurement.
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
    # A width TP does not divide is zero-padded to ceil(inter / tp) per rank (layers.linear).
    inter_local = -(-model.intermediate_size // tp_size)
    experts = max(1, model.num_local_experts)

    attn = h * q_local * d + 2 * h * kv_local * d + q_local * d * h
    mlp = 3 * h * inter_local * experts + (h * model.num_local_experts)
    layer_vectors = 2 * h
    if model.architecture.startswith(("Gemma2", "Gemma3")):
        layer_vectors += 2 * h  # pre- and post-feedforward norms around the MLP
    if model.architecture.startswith(("Qwen3", "Gemma3")):
        layer_vectors += 2 * d  # q_norm and k_norm, one head_dim vector each
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


#: Group sizes PyTorch's int4 kernels take (``layers.quantization.weights.INT4_KERNEL_GROUPS``).
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def int4_group_for(width: int, requested: int) -> int:
    """The int4 group size of a shard ``width`` columns wide: ``requested`` when it divides
    ``width``, else the largest of 256/128/64/32 below it that does, else the whole row.

    Args:
        width: columns (K) of the shard.
        requested: the configured group size.
    """
    if width % requested == 0:
        return requested
    for g in (256, 128, 64, 32):
        if g < requested and width % g == 0:
            return g
    return width


@dataclass(frozen=True)
class LinearStorage:
    """How one rank stores a projection's shard of N rows by K columns, scales included.

    The three forms of ``layers.quantization.weights``:

    - ``float``: N K elements of ``dtype_bytes`` (the model dtype);
    - ``int8``: N K int8 codes and one float32 scale per row (4 bytes per row);
    - ``int4``: N K / 2 bytes of nibbles and a (scale, zero) pair per group of ``group_size``
      columns, held in the activation dtype (bf16: 4 bytes a pair) once repacked for PyTorch's
      kernel, and in float32 (8 bytes a pair) where the kernel does not run: fp32 activations,
      or a shape the kernel refuses (N not a multiple of 16, a group size it lacks).

    Args:
        kind: ``float``, ``int8`` or ``int4``.
        dtype_bytes: bytes per element of the model dtype (float weights, int4 kernel scales).
        group_size: int4 columns per scale/zero pair (cut down where it does not divide K).
    """

    kind: str = "float"
    dtype_bytes: int = 2
    group_size: int = 128

    def bytes(self, n: int, k: int) -> int:
        """Bytes of an (n, k) shard in this form.

        Args:
            n: rows (outputs) of the shard.
            k: columns (inputs) of the shard.
        """
        if self.kind == "float":
            return n * k * self.dtype_bytes
        if self.kind == "int8":
            return n * k + 4 * n
        if self.kind != "int4":
            raise ValueError(f"unknown linear storage {self.kind!r}")
        g = int4_group_for(k, self.group_size)
        kernel = self.dtype_bytes == 2 and g in _INT4_KERNEL_GROUPS and n % 16 == 0
        pair = 2 * self.dtype_bytes if kernel else 8
        return n * k // 2 + n * (k // g) * pair

    def bits_per_weight(self, k: int = 4096) -> float:
        """Bits per weight of a wide shard (``k`` columns; a multiple of 16 rows).

        Args:
            k: columns of the shard (the per-row int8 scale costs 32 / k bits).
        """
        return 8 * self.bytes(16, k) / (16 * k)


@dataclass(frozen=True)
class WeightFormat:
    """What a loaded model stores: the input of :func:`predicted_weight_bytes`.

    The projections (attention, dense MLP, experts) take ``linear`` unless ``per_tensor`` names
    another storage for a checkpoint tensor (a GGUF Q4_K_M file's Q6_K tensors); the embedding,
    the LM head, MoE routers, norms and biases stay in the model dtype, as every method keeps them.

    Args:
        linear: storage of every projection.
        dtype_bytes: bytes per element of the model dtype.
        per_tensor: storage by Hugging Face checkpoint name
            (``model.layers.0.mlp.down_proj.weight``).
    """

    linear: LinearStorage
    dtype_bytes: int
    per_tensor: tuple[tuple[str, LinearStorage], ...] = ()

    @classmethod
    def unquantized(cls, dtype_bytes: int) -> WeightFormat:
        """Float weights in the model dtype."""
        return cls(LinearStorage("float", dtype_bytes), dtype_bytes)

    def storage(self, name: str) -> LinearStorage:
        """The storage of checkpoint tensor ``name``."""
        return dict(self.per_tensor).get(name, self.linear)


def rank_projections(
    model: ModelConfig,
    tp_size: int = 1,
    layer_range: tuple[int, int] | None = None,
    tp_rank: int = 0,
    expert_parallel: bool = False,
) -> list[tuple[str, int, int, int]]:
    """The projection shards one rank holds: (checkpoint name, rows, columns, copies).

    Names are the Llama family's (``model.layers.{i}.self_attn.q_proj.weight``); experts are
    listed once per layer with ``copies`` the experts on this rank.

    Args:
        model: the architecture.
        tp_size: tensor-parallel size.
        layer_range: ``[start, end)`` decoder layers on the rank (all if None).
        tp_rank: this rank's position in the TP group (expert parallelism splits unevenly).
        expert_parallel: whole experts per rank instead of every expert sliced.
    """
    h, d = model.hidden_size, model.head_dim
    start, end = layer_range or (0, model.num_hidden_layers)
    q_local = model.num_attention_heads // tp_size
    kv_local = local_kv_heads(model, tp_size)
    out: list[tuple[str, int, int, int]] = []
    for i in range(start, end):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out += [
            (f"{attn}.q_proj.weight", q_local * d, h, 1),
            (f"{attn}.k_proj.weight", kv_local * d, h, 1),
            (f"{attn}.v_proj.weight", kv_local * d, h, 1),
            (f"{attn}.o_proj.weight", h, q_local * d, 1),
        ]
        if model.is_moe_layer(i):
            experts, inter = model.num_local_experts, model.intermediate_size
            if expert_parallel and tp_size > 1:  # the first E mod tp ranks take one more
                count = experts // tp_size + (1 if tp_rank < experts % tp_size else 0)
            else:
                count, inter = experts, inter // tp_size
            out += [
                (f"{mlp}.experts.gate_proj.weight", inter, h, count),
                (f"{mlp}.experts.up_proj.weight", inter, h, count),
                (f"{mlp}.experts.down_proj.weight", h, inter, count),
            ]
        else:
            # Padded to ceil(inter / tp) when TP does not divide it (layers.linear.padded_shard).
            inter = -(-(model.dense_intermediate_size or model.intermediate_size) // tp_size)
            out += [
                (f"{mlp}.gate_proj.weight", inter, h, 1),
                (f"{mlp}.up_proj.weight", inter, h, 1),
                (f"{mlp}.down_proj.weight", h, inter, 1),
            ]
    return out


def predicted_weight_bytes(
    model: ModelConfig,
    fmt: WeightFormat,
    tp_size: int = 1,
    layer_range: tuple[int, int] | None = None,
    is_first_stage: bool = True,
    is_last_stage: bool = True,
    tp_rank: int = 0,
    expert_parallel: bool = False,
) -> int:
    """Bytes of weights one rank holds once loaded in ``fmt``: what its report measures.

    The projections at their storage's bytes (:class:`LinearStorage`, scales included), the
    rest (embedding, LM head, routers, norms, biases) in the model dtype.

    Args:
        model: the architecture.
        fmt: what the loaded model stores (``layers.quantization.weight_format``).
        tp_size: tensor-parallel size.
        layer_range: ``[start, end)`` decoder layers on this pipeline stage (all if None).
        is_first_stage: the stage holds the token embedding.
        is_last_stage: the stage holds the final norm and the LM head.
        tp_rank: this rank's position in the TP group.
        expert_parallel: MoE experts placed whole on the ranks.
    """
    counts = rank_weights(model, tp_size, layer_range, is_first_stage, is_last_stage)
    projections = rank_projections(model, tp_size, layer_range, tp_rank, expert_parallel)
    total = sum(fmt.storage(name).bytes(n, k) * copies for name, n, k, copies in projections)
    start, end = layer_range or (0, model.num_hidden_layers)
    floats = counts.vector_elements
    floats += sum(
        model.hidden_size * model.num_local_experts
        for i in range(start, end)
        if model.is_moe_layer(i)
    )
    vocab_local = padded_vocab_size(model.vocab_size, tp_size) // tp_size
    if is_first_stage:
        floats += vocab_local * model.hidden_size
    if is_last_stage and not (model.tie_word_embeddings and is_first_stage):
        floats += vocab_local * model.hidden_size
    return total + floats * fmt.dtype_bytes


#: Bits per weight of the GGUF block types llama.cpp's K-quant mixes combine (Q4_K and Q6_K).
_Q4_K_BITS, _Q6_K_BITS = 4.5, 6.5625


def stored_bits_per_weight(name: str, bits: float, k: int = 4096) -> float:
    """Bits per weight of the projections once mgpu has loaded weights of planner format ``name``.

    ``int8`` keeps one float32 scale per row; ``int4`` and AWQ/GPTQ checkpoints become int4
    groups of 128 with a bf16 scale/zero pair (4.25); GGUF Q4_0 blocks become int4 groups of 32
    (5.0), Q8_0, Q5_K and Q6_K blocks int8 (``layers.quantization.gguf``). A Q4_K mix at
    ``bits`` holds Q6_K tensors for the share that lifts it above Q4_K's 4.5 bits; those become
    int8 and the rest int4 groups of 32. Other formats are stored as they are (``bits``).

    Args:
        name: the planner's format name (``int4``, ``awq-int4``, ``q4_k_m``, ...).
        bits: the format's own bits per weight (a GGUF file's from its tensor table).
        k: columns of a typical projection (the row scale's share).
    """
    int8 = LinearStorage("int8").bits_per_weight(k)
    int4_g32 = LinearStorage("int4", 2, 32).bits_per_weight(k)
    if name in ("int4", "awq-int4", "gptq-int4"):
        return LinearStorage("int4", 2, 128).bits_per_weight(k)
    if name in ("int8", "q8_0", "q6_k", "q5_k_m", "q5_k_s"):
        return int8
    if name == "q4_0":
        return int4_g32
    if name in ("q4_k_m", "q4_k_s"):
        share = min(1.0, max(0.0, (bits - _Q4_K_BITS) / (_Q6_K_BITS - _Q4_K_BITS)))
        return (1 - share) * int4_g32 + share * int8
    return bits
