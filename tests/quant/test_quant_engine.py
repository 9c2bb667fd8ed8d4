"""int8/int4 through the whole engine: TP=2 and PP=2 agree with the unsharded quantized model,
each rank's weight bytes shrink to about a quarter of bf16 plus scales, and perplexity on text the
demo model was not trained on stays within 1% (int8) and 5% (int4) of fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mgpu import LLM
from mgpu.config import ModelConfig
from mgpu.layers.quantization import DEFAULT_INT4_GROUP_SIZE
from tests.helpers import assert_argmax_where_clear, engine_run, make_model
from tests.quant.conftest import perplexity

PROMPTS = [list(range(3, 30)), [7, 8, 9], [42]]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers wide enough for 128-column int4 groups on every TP=2 shard."""
    return make_model(
        tmp_path_factory.mktemp("quant"),
        "llama3",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        rope_scaling=None,
    )


def _run(
    path: Path,
    quantization: str | None,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "float32",
    follow: list[list[int]] | None = None,
) -> tuple[list[list[int]], list[torch.Tensor], list[dict[str, Any]]]:
    """One engine's greedy tokens, logits along ``follow`` (default: its tokens) and layout."""
    return engine_run(
        path,
        PROMPTS,
        MAX_TOKENS,
        follow,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        dtype=dtype,
        num_blocks=64,
        quantization=quantization,
    )


def _linear_elements(config: ModelConfig) -> int:
    h, d = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d * h
    per_layer = qkv + config.num_attention_heads * d * h + 3 * h * config.intermediate_size
    return per_layer * config.num_hidden_layers


def test_tp2_and_pp2_agree_with_unsharded(model_dir: Path) -> None:
    """int4: PP=2 runs the same maths on the same shards, so greedy tokens are identical. TP=2
    sums the row-parallel partial products in another order, so its logits differ by rounding:
    along the unsharded greedy continuation, TP=2 picks the same token at every position whose
    top-two margin exceeds that rounding."""
    quantization = "int4"  # int8 is covered at layer level (test_weight_only.py), to save time
    ref_tokens, ref, _ = _run(model_dir, quantization)
    assert _run(model_dir, quantization, 1, 2)[0] == ref_tokens
    _, got, _ = _run(model_dir, quantization, 2, 1, follow=ref_tokens)
    decided = 0
    for prompt, r, g in zip(PROMPTS, ref, got, strict=True):
        assert (g - r).abs().max() <= 0.05 * r.abs().max()
        # positions that predict the continuation
        decided += assert_argmax_where_clear(r, g, slice(len(prompt) - 1, -1))
    assert decided >= len(PROMPTS) * MAX_TOKENS // 2  # the check is not vacuous


def test_per_rank_weight_bytes(model_dir: Path) -> None:
    """TP=2 int4 in bf16: each rank's linears take 1/2 byte a weight plus a bf16 scale/zero pair
    per group of 128, about a quarter of bf16; the embeddings and norms are unchanged."""
    config = ModelConfig.from_file(model_dir)
    linear = _linear_elements(config)
    bf16 = _run(model_dir, None, tp=2, dtype="bfloat16")[2]
    int4 = _run(model_dir, "int4", tp=2, dtype="bfloat16")[2]
    for full, quant in zip(bf16, int4, strict=True):
        other = full["param_bytes"] - linear // 2 * 2  # embeddings, norms, LM head of the rank
        linear_bytes = quant["param_bytes"] - other
        expected = linear // 2 * (0.5 + 4 / DEFAULT_INT4_GROUP_SIZE)
        assert linear_bytes == pytest.approx(expected, rel=0.01)
        assert 0.25 <= linear_bytes / (linear // 2 * 2) <= 0.25 + 2 / DEFAULT_INT4_GROUP_SIZE + 1e-6


def test_perplexity_of_the_demo_model(fp32_perplexity: float, held_out_ids: list[int]) -> None:
    """fp32 against int8/int4 in bf16, the kernels' path (fp32 runs the dequantising one)."""
    ppl = {}
    for quantization in ("int8", "int4"):
        with LLM(
            None, device="cpu", dtype="bfloat16", num_blocks=64, quantization=quantization
        ) as llm:
            ppl[quantization] = perplexity(llm, held_out_ids)
    assert abs(ppl["int8"] / fp32_perplexity - 1) <= 0.01, (ppl, fp32_perplexity)
    assert abs(ppl["int4"] / fp32_perplexity - 1) <= 0.05, (ppl, fp32_perplexity)
