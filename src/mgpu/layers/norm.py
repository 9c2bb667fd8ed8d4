"""RMSNorm, computed in float32 as Hugging Face's Llama does, with a fused residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mgpu.layers.linear import load_replicated


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; replicated on every TP rank."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = load_replicated  # type: ignore[attr-defined]

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``x + residual`` (tokens, hidden); returns (normed, new residual)."""
        if residual is not None:
            x = x + residual
        residual = x
        # One fused kernel on the float32 upcast (a no-op view for float32 activations), then the
        # cast back before the weight, exactly where transformers' LlamaRMSNorm casts.
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * h.to(x.dtype), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's ``x / rms(x) * (1 + weight)``: the checkpoint stores the offset from one, and the
    product is taken in float32 before the cast back (transformers' Gemma2RMSNorm)."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise ``x + residual`` (tokens, hidden); returns (normed, new residual)."""
        if residual is not None:
            x = x + residual
        residual = x
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype), residual
