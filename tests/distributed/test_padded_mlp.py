"""An intermediate size the TP size does not divide: zero-padded shards, the same output.

75 divides by neither 2 nor 4: at TP=2 each rank holds 38 gate/up rows and down columns (rank 1
one zero row and column), at TP=4 19 each (rank 3 one of each zero). Logits and greedy tokens
must equal transformers', for Llama (SwiGLU) and Gemma 2 (GeGLU).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from mgpu.layers.linear import padded_shard
from tests.helpers import hf_greedy, make_model

PROMPT = list(range(3, 30))


def test_padded_shard() -> None:
    assert padded_shard(128, 4) == 32  # divides: no padding, whatever the multiple
    assert padded_shard(128, 4, 128) == 32
    assert padded_shard(75, 2) == 38
    assert padded_shard(75, 4) == 19
    assert padded_shard(11008, 3, 128) == 3712  # int4 groups of 128 stay whole
    assert padded_shard(3, 4) == 1  # rank 3 holds only zeros


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple]:
    """Per family, built on first use: (path, HF logits of PROMPT, HF greedy tokens) of a model
    with intermediate size 75."""
    built: dict[str, tuple] = {}

    def get(arch: str) -> tuple[Path, torch.Tensor, list[int]]:
        if arch not in built:
            path = make_model(tmp_path_factory.mktemp(arch), arch, intermediate_size=75)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = hf(torch.tensor([PROMPT])).logits[0]
            built[arch] = (path, logits, hf_greedy(hf, PROMPT, 12))
        return built[arch]

    return get


# Gemma shares the padded MLP (with GeGLU); TP=4 is checked on Llama only, to keep the run short.
@pytest.mark.parametrize(("arch", "tp"), [("llama3", 2), ("llama3", 4), ("gemma2", 2)])
def test_padded_intermediate_matches_transformers(odd_models: Callable, arch: str, tp: int) -> None:
    path, ref_logits, ref_greedy = odd_models(arch)
    with LLM(
        str(path), tensor_parallel_size=tp, device="cpu", dtype="float32", num_blocks=32
    ) as llm:
        assert (llm.prompt_logits(PROMPT) - ref_logits).abs().max().item() <= 1e-4
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref_greedy
        # The planner's prediction counts the padded shards (ceil(75 / tp) rows per rank).
        for row in llm.layout():
            assert row["predicted_param_bytes"] == row["param_bytes"], row


def test_padded_gguf_mlp_at_tp3(tmp_path: Path) -> None:
    """A GGUF file whose Q8_0 MLP (intermediate 320) TP=3 does not divide: the padded shards are
    read as floats from the blocks and padded, so the output is transformers' on the file's own
    (dequantised) weights."""
    from gguf import GGMLQuantizationType as T

    from tests.quant.gguf_files import write_gguf

    model_dir = make_model(
        tmp_path / "hf",
        "llama3",
        rope_scaling=None,
        hidden_size=192,
        intermediate_size=320,
        num_attention_heads=12,
        num_key_value_heads=6,
        num_hidden_layers=2,
    )
    mlp = {name: T.Q8_0 for name in ("gate_proj", "up_proj", "down_proj")}
    held = write_gguf(model_dir, tmp_path / "m.gguf", T.F32, mlp)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.load_state_dict(held, strict=False)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]  # (T, vocab)
    with LLM(
        str(tmp_path / "m.gguf"),
        tensor_parallel_size=3,
        device="cpu",
        dtype="float32",
        num_blocks=16,
    ) as llm:
        assert (llm.prompt_logits(PROMPT) - ref).abs().max().item() <= 1e-3
