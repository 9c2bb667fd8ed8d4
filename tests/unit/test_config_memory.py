"""Config parsing and validation, and the shared memory formula against real parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu.config import ModelConfig, ParallelConfig, valid_tp_sizes
from mgpu.errors import ConfigError
from mgpu.layers.rotary import rope_inv_freq
from mgpu.memory import kv_bytes_per_token, rank_weights


def test_valid_tp_sizes_and_message(tiny_llama) -> None:
    config = ModelConfig.from_file(tiny_llama)  # 8 heads, 2 KV heads
    assert valid_tp_sizes(config) == [1, 2, 4, 8]
    with pytest.raises(ConfigError, match="sizes that work: 1, 2, 4, 8"):
        ParallelConfig(tensor_parallel_size=3).check_model(config)


def test_layer_split_validation(tiny_llama) -> None:
    config = ModelConfig.from_file(tiny_llama)  # 3 layers
    assert ParallelConfig(pipeline_parallel_size=2).layer_range(config, 0) == (0, 2)
    assert ParallelConfig(1, 2, (1, 2)).layer_range(config, 1) == (1, 3)
    with pytest.raises(ConfigError, match="sum to the model's 3 layers"):
        ParallelConfig(1, 2, (1, 1)).check_model(config)


def test_weight_count_matches_transformers(tiny_llama) -> None:
    config = ModelConfig.from_file(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama)
    counts = rank_weights(config, 1)
    assert counts.matrix_elements + counts.vector_elements == sum(
        p.numel() for p in hf.parameters()
    )


def test_kv_bytes_per_token(tiny_llama) -> None:
    config = ModelConfig.from_file(tiny_llama)  # 3 layers, 2 KV heads of 8
    assert kv_bytes_per_token(config, 3, 1, 2) == 2 * 3 * 2 * 8 * 2
    assert kv_bytes_per_token(config, 3, 4, 2) == 2 * 3 * 1 * 8 * 2  # replicated head


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
        "rope_theta": 500000.0,
    }
    hf_config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=raw)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inv_freq(
        128,
        500000.0,
        ModelConfig.from_dict(
            {**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]}
        ).rope_scaling,
    )
    torch.testing.assert_close(ours, expected)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="missing the field 'hidden_size'"):
        ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"]})
