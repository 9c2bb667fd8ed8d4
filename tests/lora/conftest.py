"""PEFT adapters over the bundled demo model, and ``peft``'s own greedy text as the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from mgpu.models.loader import demo_model_path
from tests.helpers import greedy_continuations

PROMPTS = ["The cat sat on", "Tensor parallelism splits", "She wrote the answer"]
MAX_TOKENS = 10
#: Factor on peft's random B: enough to change the greedy text clearly.
SCALE_B = 4.0

#: name -> (rank, alpha, target modules, seed) of each test adapter.
ADAPTERS = {
    "all": (
        8,
        16,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        1,
    ),
    "qv": (4, 8, ["q_proj", "v_proj"], 2),
}


def make_adapter(path: Path, rank: int, alpha: int, targets: list[str], seed: int) -> Path:
    """Save a PEFT adapter with random non-zero A and B over the demo model (safetensors)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(demo_model_path())
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, lora_dropout=0.0
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(SCALE_B)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The :data:`ADAPTERS`, saved by peft."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, *spec) for name, spec in ADAPTERS.items()}


def greedy(model: torch.nn.Module) -> list[list[int]]:
    """Greedy continuations of :data:`PROMPTS` by a transformers (or peft) model."""
    return greedy_continuations(model, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="session")
def references(adapters: dict[str, Path]) -> dict[str | None, list[list[int]]]:
    """peft's greedy tokens for each adapter, and transformers' for the base model (key None)."""
    from peft import PeftModel

    refs: dict[str | None, list[list[int]]] = {
        None: greedy(AutoModelForCausalLM.from_pretrained(demo_model_path()))
    }
    for name, path in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(demo_model_path())
        refs[name] = greedy(PeftModel.from_pretrained(base, path))
    return refs
