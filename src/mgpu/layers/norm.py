"""RMSNorm, computed in float32 as Hugging Face's Llama does, with a fused residual add.

On CPU the whole norm with its residual add is one call of :mod:`mgpu.layers.cpu_kernels`'s
``rms_norm`` (the PyTorch form is five to seven operators, whose dispatch is the whole cost at a
decode step's few rows), rounded where the PyTorch form rounds; it stands aside inside
``torch.compile``'s tracing (Inductor fuses the PyTorch form itself) and autograd's recording.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from mgpu.layers import cpu_kernels
from mgpu.layers.linear import load_replicated


def _cpu_kernel(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, gemma: bool
) -> ModuleType | None:
    """The CPU kernels' module where its ``rms_norm`` computes what the PyTorch form would
    (x (..., hidden), a residual of x's dtype and shape, a Llama weight of x's dtype: a
    float32 weight would promote the PyTorch form's output to float32), else None."""
    if (
        x.dim() == 0
        or (residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape))
        or weight.dtype not in ((x.dtype, torch.float32) if gemma else (x.dtype,))
    ):
        return None
    return cpu_kernels.kernel_for(x, weight, *([] if residual is None else [residual]))


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
        kernel = _cpu_kernel(x, residual, self.weight, gemma=False)
        if kernel is not None:
            return _kernel_norm(kernel, x, residual, self.weight, self.eps, gemma=False)
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
        kernel = _cpu_kernel(x, residual, self.weight, gemma=True)
        if kernel is not None:
            return _kernel_norm(kernel, x, residual, self.weight, self.eps, gemma=True)
        if residual is not None:
            x = x + residual
        residual = x
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype), residual


def _kernel_norm(
    kernel: ModuleType,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    gemma: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's norm of x (..., hidden) (per-head q/k norms are (tokens, heads, d)), as rows."""
    shape, hidden = x.shape, x.shape[-1]
    flat = x.reshape(-1, hidden).contiguous()
    flat_residual = None if residual is None else residual.reshape(-1, hidden).contiguous()
    out, new_residual = kernel.rms_norm(flat, flat_residual, weight, eps, gemma)
    return out.view(shape), new_residual.view(shape)
