"""Automatic placement from per-device memory (``device_memory=[...]`` on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from mgpu.config import ModelConfig
from mgpu.engine.placement import GIB, auto_layout, parse_device_memory
from mgpu.errors import ConfigError
from mgpu.memory import weight_bytes_per_rank
from tests.helpers import make_model


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 4.6 MB of float32 weights: more than 4 MiB x 0.9, less than 6 MiB x 0.9."""
    return make_model(
        tmp_path_factory.mktemp("six"),
        "llama3",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
    )


def test_parse_device_memory() -> None:
    assert parse_device_memory("24GiB,12GiB") == (24 * GIB, 12 * GIB)
    assert parse_device_memory(["1GiB", "0.5GiB"]) == (GIB, GIB // 2)
    assert parse_device_memory("512MiB") == (512 * 2**20,)
    with pytest.raises(ConfigError, match="24 parsecs"):
        parse_device_memory("24 parsecs")


def test_unequal_budgets_give_an_uneven_split(six_layers: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(six_layers, dtype=torch.float32).eval()
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        expected = list(prompt)
        for _ in range(8):
            expected.append(int(hf(torch.tensor([expected])).logits[0, -1].argmax()))
    with LLM(
        str(six_layers),
        device="cpu",
        dtype="float32",
        device_memory=["4MiB", "2MiB"],
        num_blocks=16,
    ) as llm:
        rows = llm.layout()
        assert len(rows) == 2
        (a, b), (c, d) = rows[0]["layers"], rows[1]["layers"]
        assert (a, d) == (0, 6) and b == c
        assert b - a > d - c  # the larger budget holds more layers
        assert rows[0]["param_bytes"] > rows[1]["param_bytes"]
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected[len(prompt) :]


def test_too_large_is_refused_before_loading(six_layers: Path) -> None:
    with pytest.raises(ConfigError, match=r"GiB short"):
        LLM(str(six_layers), device="cpu", device_memory=["1MiB", "1MiB"], num_blocks=16)


def test_heads_not_divisible_by_three_devices() -> None:
    """32 heads on 3 equal devices that the model needs all of: a pipeline of 3, not TP=3."""
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=1000,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
        num_local_experts=0,
        num_experts_per_tok=0,
        bos_token_id=None,
        eos_token_ids=(0,),
        sliding_window=None,
    )
    whole = weight_bytes_per_rank(config, 32, vector_bytes=4)
    layout = auto_layout(config, 4, (int(whole * 0.5),) * 3)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (1, 3)
    assert sum(layout.layer_split) == 6
    assert auto_layout(config, 4, (whole * 2,) * 3).world_size == 1  # fits one: one rank
    assert auto_layout(config, 4, (int(whole * 0.7),) * 2).tensor_parallel_size == 2
