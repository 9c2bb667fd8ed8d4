"""HF architecture name -> model class, built from what each class declares; no fuzzy matching.

A family is added by writing its class (with ``architectures``) and listing it in ``_FAMILIES``;
the loader needs no change, since it asks the model for its checkpoint names.
"""

from __future__ import annotations

from mgpu.config import ModelConfig
from mgpu.errors import UnsupportedModelError
from mgpu.models.base import CausalLM
from mgpu.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from mgpu.models.llama import LlamaForCausalLM
from mgpu.models.mixtral import MixtralForCausalLM
from mgpu.models.qwen3 import Qwen3ForCausalLM

_FAMILIES: tuple[type[CausalLM], ...] = (
    LlamaForCausalLM,
    Qwen3ForCausalLM,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    MixtralForCausalLM,
)

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    arch: cls for cls in _FAMILIES for arch in cls.architectures
}


def supported_architectures() -> list[str]:
    """Every HF architecture name the engine runs, sorted."""
    return sorted(MODEL_REGISTRY)


def model_class(config: ModelConfig) -> type[CausalLM]:
    """The class implementing ``config.architecture``; a clear error for anything else."""
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} is not supported; mgpu runs "
            f"{', '.join(supported_architectures())}"
        ) from None
