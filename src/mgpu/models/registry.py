"""HF architecture name -> model class. One entry per supported architecture, no fuzzy matching."""

from __future__ import annotations

from torch import nn

from mgpu.config import ModelConfig
from mgpu.errors import UnsupportedModelError
from mgpu.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The class implementing ``config.architecture``; a clear error for anything else."""
    try:
        cls = MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} is not supported; mgpu runs "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
    if config.is_moe:
        raise UnsupportedModelError(
            f"{config.architecture} with {config.num_local_experts} experts (MoE) is not "
            "supported yet"
        )
    return cls
