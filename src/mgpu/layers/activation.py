"""Gated activations on a fused gate/up projection: SwiGLU (Llama, Qwen, Mixtral), GeGLU (Gemma)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mgpu.errors import UnsupportedModelError


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(tokens, 2 * inter) laid out as [gate | up] -> (tokens, inter) = silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(tokens, 2 * inter) laid out as [gate | up] -> (tokens, inter) = gelu_tanh(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


#: ``hidden_act`` of config.json -> the gated activation of the MLP.
GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
}


def gated_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated activation called ``name`` in config.json; a clear error for any other."""
    try:
        return GATED_ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported (supported: {', '.join(GATED_ACTIVATIONS)})"
        ) from None
