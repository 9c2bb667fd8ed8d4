"""The engine against Hugging Face ``transformers`` on the same random weights (CPU, fp32).

For each architecture and layout: logits at every prompt position within 1e-4, greedy 32-token
continuations identical, a batch of prompts of different lengths run together, and (without
pipeline stages) each rank's parameter bytes close to its 1/N share. The Llama-3 config has 2 KV
heads, so TP=4 replicates them; the Mistral config has a vocabulary (321) that divides by neither 2
nor 4. The Gemma configs have an 8-token sliding window, shorter than the prompts; the MoE configs
have 4 experts and top-2 routing, also run with expert parallelism over 2 ranks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from mgpu.config import ModelConfig
from mgpu.memory import rank_weights
from tests.helpers import hf_greedy, make_model

CONFIGS = {
    "llama3": {"num_key_value_heads": 2},
    "mistral": {"vocab_size": 321},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {},
    "gemma3": {},
    "mixtral": {},
    "qwen3_moe": {},
}
PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(100, 117)), [42]]

#: (tensor parallel, pipeline parallel, expert parallel) layouts each family is checked at.
_DENSE = [(1, 1, False), (2, 1, False), (1, 2, False)]
_MOE = [*_DENSE, (2, 1, True)]
LAYOUTS = {
    "llama3": [(1, 1, False), (2, 1, False), (4, 1, False)],
    "mistral": [(1, 1, False), (2, 1, False), (4, 1, False)],
    "qwen2": [(1, 1, False), (2, 1, False), (4, 1, False)],
    "qwen3": _DENSE,
    "gemma2": _DENSE,
    "gemma3": _DENSE,
    "mixtral": _MOE,
    "qwen3_moe": [*_MOE, (2, 2, True)],
}
CASES = [
    pytest.param(arch, layout, id=f"{arch}-tp{layout[0]}-pp{layout[1]}{'-ep' * layout[2]}")
    for arch in sorted(CONFIGS)
    for layout in LAYOUTS[arch]
]


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(model dir, HF logits of PROMPTS[0], HF greedy continuations of every prompt, HF bytes)."""
    arch = request.param
    path = make_model(tmp_path_factory.mktemp(arch), arch, **CONFIGS[arch])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0]])).logits[0]
    greedy = [hf_greedy(hf, ids) for ids in PROMPTS]
    total_bytes = sum(p.numel() * 4 for p in hf.parameters())
    return path, logits, greedy, total_bytes


@pytest.mark.parametrize(("reference", "layout"), CASES, indirect=["reference"])
def test_matches_transformers(reference, layout: tuple[int, int, bool]) -> None:
    path, ref_logits, ref_greedy, total_bytes = reference
    tp, pp, ep = layout
    with LLM(
        str(path),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        enable_expert_parallel=ep,
        device="cpu",
        dtype="float32",
        num_blocks=64,
    ) as llm:
        logits = llm.prompt_logits(PROMPTS[0])
        assert logits.shape == ref_logits.shape
        assert (logits - ref_logits).abs().max().item() <= 1e-4

        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        for out, expected in zip(outs, ref_greedy, strict=True):
            assert out.outputs[0].token_ids == expected
            assert out.outputs[0].finish_reason == "length"

        reports = llm.engine.rank_reports
        assert len(reports) == tp * pp
        if pp == 1:
            config = ModelConfig.from_file(path)
            replicated = rank_weights(config, tp).replicated_elements * 4
            for report in reports:
                assert report.param_bytes <= total_bytes / tp * 1.05 + replicated, report


@pytest.fixture(scope="module")
def qwen_four_layers(tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer tied Qwen2-style model: a tied LM head on a stage without the embedding."""
    path = make_model(tmp_path_factory.mktemp("qwen4"), "qwen2", num_hidden_layers=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0]])).logits[0]
    return path, logits, hf_greedy(hf, PROMPTS[0])


@pytest.mark.parametrize(
    ("tp", "pp", "split"),
    [(1, 2, None), (1, 3, None), (2, 2, None), (1, 2, (3, 1))],
    ids=["pp2", "pp3", "tp2xpp2", "pp2-uneven-3-1"],
)
def test_pipeline_layouts_match_transformers(qwen_four_layers, tp: int, pp: int, split) -> None:
    path, ref_logits, ref_greedy = qwen_four_layers
    with LLM(
        str(path),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        layer_split=split,
        device="cpu",
        dtype="float32",
        num_blocks=64,
    ) as llm:
        assert (llm.prompt_logits(PROMPTS[0]) - ref_logits).abs().max().item() <= 1e-4
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 3, params, use_tqdm=False)
        assert all(o.outputs[0].token_ids == ref_greedy for o in outs)
        ranges = [r.layer_range for r in llm.engine.rank_reports]
    expected = split or {2: (2, 2), 3: (2, 1, 1)}[pp]
    assert [b - a for a, b in ranges[::tp]] == list(expected)


@pytest.mark.parametrize("reference", ["gemma2", "gemma3", "mixtral"], indirect=True)
def test_chunked_prefill_matches_transformers(reference) -> None:
    """Prompts prefilled 16 tokens a step: the later chunks attend to the cache through the
    sliding window (Gemma) and route each chunk's tokens afresh (Mixtral)."""
    path, _, ref_greedy, _ = reference
    with LLM(
        str(path), device="cpu", dtype="float32", num_blocks=64, max_num_batched_tokens=16
    ) as llm:
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy
