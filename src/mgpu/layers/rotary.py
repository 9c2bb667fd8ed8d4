"""Rotary position embedding (rotate-half form of HF Llama/Qwen/Gemma); llama3, linear scaling."""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from mgpu.config import RopeScaling
from mgpu.layers import cpu_kernels


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), float32, with Llama 3.1's or linear rescaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        return inv_freq / scaling.factor
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and a smooth ramp
    # between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin of RoPE for the step's positions.

    They are computed per step from the inverse frequencies rather than looked up in
    (max_positions, head_dim) tables: a table pair of a 128k-context model with 256-wide heads
    (Gemma 3) is 256 MB per rank, the per-step product a few microseconds. The products are the
    float32 ones transformers computes, so the angles are identical.
    """

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None
    ):
        super().__init__()
        self.max_positions = max_positions
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions (tokens,), each (tokens, 1, head_dim) in ``dtype``.

        Computed once per step and shared by every layer. Positions are checked against
        ``max_positions`` by the model runner, on the host.
        """
        freqs = positions.float().unsqueeze(1) * self.inv_freq  # (tokens, head_dim / 2), float32
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # (tokens, 1, head_dim)
        # cos/sin in float32, cast to the activation dtype after, as transformers casts them.
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x (tokens, heads, d) by RotaryEmbedding's (cos, sin), each (tokens, 1, d).

    On CPU, one call of :mod:`mgpu.layers.cpu_kernels`'s ``rotary`` (the PyTorch form below is
    seven operators, whose dispatch is the whole cost at a decode step's few tokens; in bfloat16
    and float16 the kernel rounds where they round, so its result is theirs bit for bit);
    not inside ``torch.compile``'s tracing (Inductor fuses the
    PyTorch form) or autograd's recording.
    """
    cos, sin = rope
    kernel = _cpu_kernel(x, cos, sin)
    if kernel is not None:
        return kernel.rotary(x, cos.contiguous(), sin.contiguous())
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _cpu_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> ModuleType | None:
    """The CPU kernels' module where its ``rotary`` computes what the PyTorch form would, else
    None."""
    if (
        x.dim() != 3
        or x.stride(-1) != 1
        or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or cos.dtype != x.dtype
        or sin.dtype != x.dtype
        or cos.shape != (x.shape[0], 1, x.shape[2])
    ):
        return None
    return cpu_kernels.kernel_for(x, cos, sin)
