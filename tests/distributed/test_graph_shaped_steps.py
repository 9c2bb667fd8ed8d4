"""Graph-shaped decode steps against the plain path, end to end on CPU (TP=1 with LoRA, TP=2, PP=2).

A graph-shaped step is what a CUDA graph replays: the batch padded to its bucket, the block tables
to their width bucket, the padding rows in the scratch block, the outputs sliced back. On CPU the
tests' switch (``MGPU_TEST_GRAPH_SHAPED=1``) runs exactly that path eagerly. Each engine decodes
the same requests twice, graph-shaped and then on the plain path (its graphs released): the greedy
tokens must be identical and the log-probabilities (the chosen token's and the top 5) agree to
fp32 rounding. Five prompts pad to a batch of 8 (between buckets), then 4 for 3 rows as they
finish; their contexts cross the width buckets (4-token blocks: 2, 4, 8 and 16 blocks wide).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from mgpu.engine.cuda_graph import GRAPH_SHAPED_ENV
from mgpu.engine.llm_engine import RequestOutput

PROMPT_LENS = (5, 9, 17, 3, 30)
MAX_TOKENS = (28, 12, 22, 6, 18)
BLOCK = 4


def _prompts() -> list[dict]:
    return [{"prompt_token_ids": list(range(3 + i, 3 + i + n))} for i, n in enumerate(PROMPT_LENS)]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=5) for m in MAX_TOKENS
    ]


def _assert_same(graph: list[RequestOutput], plain: list[RequestOutput]) -> None:
    """Identical tokens; log-probabilities within fp32 rounding of GEMMs over different row counts
    (1e-5, relative beyond magnitude 1: MKL rounds a 4-row product unlike a 3-row one)."""
    for g, p in zip(graph, plain, strict=True):
        assert g.outputs[0].token_ids == p.outputs[0].token_ids
        for gs, ps in zip(g.outputs[0].logprobs, p.outputs[0].logprobs, strict=True):
            assert gs.logprob == pytest.approx(ps.logprob, rel=1e-5, abs=1e-5)
            assert [t for t, _ in gs.top_logprobs] == [t for t, _ in ps.top_logprobs]
            for (_, a), (_, b) in zip(gs.top_logprobs, ps.top_logprobs, strict=True):
                assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def _decode_both_ways(llm: LLM, lora: list[str | None] | None = None) -> None:
    """Decode graph-shaped, then plain; compare, and check which shapes ran graph-shaped."""
    executor = llm.engine.executor
    graph = llm.generate(_prompts(), _params(), use_tqdm=False, lora_request=lora)
    steps = executor.call_all("decode_graph_steps")
    executor.call_all("release_decode_graphs")
    plain = llm.generate(_prompts(), _params(), use_tqdm=False, lora_request=lora)
    assert executor.call_all("decode_graph_steps") == [{}] * len(steps)
    _assert_same(graph, plain)
    for shapes in steps:  # every rank ran its decode steps graph-shaped, at several shapes
        assert {w for _, w in shapes} >= {8, 16}
        assert any(b == 4 for b, _ in shapes)  # 3 rows padded to 4 (at PP=2: a micro-batch)
        if llm.engine.max_steps_in_flight == 1:
            assert (8, 8) in shapes  # 5 rows padded to 8


def _engine(path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> LLM:
    monkeypatch.setenv(GRAPH_SHAPED_ENV, "1")
    llm = LLM(
        str(path),
        device="cpu",
        dtype="float32",
        num_blocks=96,
        block_size=BLOCK,
        max_model_len=128,
        enable_prefix_caching=False,  # the second run prefills again, as the first did
        **kwargs,
    )
    report = llm.engine.graph_reports[0]
    assert report.mode == "eager" and report.widths == (1, 2, 4, 8, 16, 32)
    return llm


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random PEFT adapter of the tiny Llama (non-zero B, so it changes the text)."""
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def test_tp1_with_lora_matches_the_plain_path(
    tiny_llama: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adapter rows, base rows and padding rows in one batch; the adapter requests finish first,
    so the last steps run with no adapter at all (all-zero mask rows)."""
    with _engine(tiny_llama, monkeypatch, enable_lora=True, lora_modules=[f"a={adapter}"]) as llm:
        lora = [None, "a", None, "a", None]
        _decode_both_ways(llm, lora)
        one = [_prompts()[1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        adapted = llm.generate(*one, use_tqdm=False, lora_request="a")[0].outputs[0].token_ids
        assert adapted != llm.generate(*one, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "layout",
    [
        {"tensor_parallel_size": 2},
        # Two micro-batches in flight: stage 0 runs the next step while stage 1 takes its copy.
        {"pipeline_parallel_size": 2, "max_steps_in_flight": 2},
    ],
    ids=["tp2", "pp2"],
)
def test_parallel_layouts_match_the_plain_path(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, layout: dict
) -> None:
    with _engine(tiny_llama, monkeypatch, **layout) as llm:
        _decode_both_ways(llm)
