"""The trained adapter in ``peft``, and the merged model served by mgpu's engine at TP=1 and 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from mgpu.cli import main as mgpu_main
from mgpu.models.loader import demo_model_path
from mgpu.train.trainer import train
from tests.helpers import greedy_continuations
from tests.train.conftest import records, write_jsonl
from tests.train.test_train import quick

PROMPTS = ["The cat sat on", "Tensor parallelism splits"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained for a few steps, far enough from zero to change the text."""
    from accelerate.state import AcceleratorState, GradientState

    tmp = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(tmp / "train.jsonl", records(8))
    train(quick(data, tmp / "out", learning_rate=3e-2, target_modules="all-linear"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return tmp / "out"


def greedy(model: torch.nn.Module) -> list[list[int]]:
    """Greedy continuations of :data:`PROMPTS` by a transformers (or peft) model."""
    return greedy_continuations(model, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def peft_greedy(adapter: Path) -> list[list[int]]:
    """Greedy continuations from peft over transformers: the reference."""
    base = AutoModelForCausalLM.from_pretrained(demo_model_path())
    return greedy(PeftModel.from_pretrained(base, adapter))


def test_adapter_loads_in_peft(adapter: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(demo_model_path())
    model = PeftModel.from_pretrained(base, adapter)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)
    assert any(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)


def test_adapter_changes_the_text(peft_greedy: list[list[int]]) -> None:
    base = AutoModelForCausalLM.from_pretrained(demo_model_path())
    assert greedy(base) != peft_greedy


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_model_served_by_mgpu_matches_peft(
    adapter: Path, peft_greedy: list[list[int]], tmp_path: Path, tp: int
) -> None:
    merged = tmp_path / "merged"
    status = mgpu_main(["merge", "--adapter", str(adapter), "--output", str(merged)])
    assert status == 0
    assert list(merged.glob("*.safetensors"))
    assert (merged / "tokenizer.json").is_file()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(merged), tensor_parallel_size=tp, device="cpu", dtype="float32") as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == peft_greedy


def test_trained_adapter_served_unmerged_matches_peft(
    adapter: Path, peft_greedy: list[list[int]]
) -> None:
    """The train -> serve loop without merging: the adapter beside the base model at TP=2."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(
        tensor_parallel_size=2,
        device="cpu",
        dtype="float32",
        enable_lora=True,
        lora_modules=[f"trained={adapter}"],
    ) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False, lora_request="trained")
    assert [list(o.outputs[0].token_ids) for o in outs] == peft_greedy
