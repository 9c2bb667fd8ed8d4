"""Vocab-parallel token embedding and LM head.

The vocabulary is padded up to a multiple of the TP size and split in contiguous row ranges::

    vocab 10, tp 4 -> padded 12, rank r owns ids [3r, 3r+3); rank 3 holds ids 9..11, rows 10 and 11
    are padding (zeros, never looked up; their logits are sliced off before sampling)

Embedding: each rank looks up the ids it owns, zeros the rest, and an all-reduce sums the shards.
LM head: each rank computes logits for its ids; the shards are gathered onto TP rank 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mgpu.distributed import parallel_state as ps
from mgpu.distributed.communication import tp_all_reduce, tp_gather_last_dim
from mgpu.layers.linear import LazyTensor, _copy, check_shape
from mgpu.layers.matmul import dense_linear, pack_module_weight
from mgpu.memory import padded_vocab_size


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows are split over the TP ranks."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        tp = ps.get_tp_size()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, tp)
        self.local_vocab = self.padded_vocab_size // tp
        self.vocab_start = ps.get_tp_rank() * self.local_vocab
        self.weight = nn.Parameter(torch.zeros(self.local_vocab, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded: LazyTensor, shard_id: object = None
    ) -> None:
        """Copy this rank's rows of the (vocab, hidden) checkpoint tensor; padding stays zero."""
        check_shape(loaded, (self.vocab_size, self.hidden_size), param.checkpoint_name)  # type: ignore[attr-defined]
        end = min(self.vocab_start + self.local_vocab, self.vocab_size)
        if end > self.vocab_start:
            _copy(param[: end - self.vocab_start], loaded[self.vocab_start : end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(tokens,) int64 -> (tokens, hidden)."""
        if ps.get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to vocabulary logits, split by vocabulary rows like the embedding.

    ``tied`` is set by the model when the head shares the embedding's weight: that weight stays
    plain (the embedding looks its rows up); an untied head's is reordered for oneDNN on CPU.
    """

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.tied = False

    def process_weights_after_loading(self) -> None:
        """On CPU, reorder an untied head's weight for oneDNN (see :mod:`mgpu.layers.matmul`)."""
        if not self.tied:
            pack_module_weight(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """(tokens, hidden) -> (tokens, vocab) float32 logits on TP rank 0, None on other ranks."""
        local = dense_linear(hidden, self.weight)  # (tokens, vocab / tp)
        full = tp_gather_last_dim(local)
        if full is None:
            return None
        return full[:, : self.vocab_size].float()
