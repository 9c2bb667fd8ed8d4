"""CUDA graphs of decode steps against eager steps on the GPU (``mgpu.engine.cuda_graph``).

Three sequences pad to a batch of 4 (between the buckets 2 and 4), and their contexts cross the
width buckets (4-token blocks: 2, 4, 8 and 16 blocks wide) while they decode. The graphs' greedy
tokens must be the eager engine's, and their log-probabilities agree to fp32 rounding (padded
shapes may pick other GEMM kernels). ``--enforce-eager`` captures nothing. Skipped without CUDA;
TP=2 and PP=2 need two GPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgpu import LLM, SamplingParams
from mgpu.engine.llm_engine import RequestOutput
from tests.helpers import make_model

pytestmark = pytest.mark.gpu
PROMPT_LENS = (5, 9, 17)
MAX_TOKENS = (30, 20, 25)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("graphs"), "llama3", num_key_value_heads=2)


def _engine(path: Path, layout: dict, **kwargs: object) -> LLM:
    return LLM(
        str(path),
        device="cuda",
        dtype="float32",
        num_blocks=96,
        block_size=4,
        max_model_len=128,
        max_num_seqs=8,
        enable_prefix_caching=False,
        **layout,
        **kwargs,
    )


def _decode(llm: LLM) -> list[RequestOutput]:
    prompts = [
        {"prompt_token_ids": list(range(3 + i, 3 + i + n))} for i, n in enumerate(PROMPT_LENS)
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=5) for m in MAX_TOKENS
    ]
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize(
    "layout",
    [{}, {"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
    ids=["tp1", "tp2", "pp2"],
)
def test_graphs_match_eager_steps(model_dir: Path, layout: dict) -> None:
    if layout and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with _engine(model_dir, layout) as llm:
        reports = llm.engine.graph_reports
        assert reports and all(r.mode == "cuda" and r.error is None for r in reports)
        assert all(r.num_graphs == 4 * 6 for r in reports)  # batch 1, 2, 4, 8 x width 1 .. 32
        assert all(r.memory_bytes > 0 for r in reports)
        graphs = _decode(llm)
        steps = llm.engine.executor.call_all("decode_graph_steps")
        whole_batches = llm.engine.max_steps_in_flight == 1  # PP=2: micro-batches of 2 and 1
    for shapes in steps:  # every rank replayed graphs, 3 rows at batch 4, across widths
        assert {w for _, w in shapes} >= {8, 16}
        assert any(b == 4 for b, _ in shapes) or not whole_batches
    with _engine(model_dir, layout, enforce_eager=True) as llm:
        assert llm.engine.graph_reports == []
        eager = _decode(llm)
        assert llm.engine.executor.call_all("decode_graph_steps") == [{}] * len(steps)
    for g, e in zip(graphs, eager, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for gs, es in zip(g.outputs[0].logprobs, e.outputs[0].logprobs, strict=True):
            assert gs.logprob == pytest.approx(es.logprob, rel=1e-4, abs=1e-4)
            for (gt, a), (et, b) in zip(gs.top_logprobs, es.top_logprobs, strict=True):
                assert gt == et and a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_steps_keep_working_after_a_prefill_between_replays(model_dir: Path) -> None:
    """A request that arrives while others decode: its prefill step runs eagerly, the decode steps
    around it replay graphs, and the text is the eager engine's."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(5, 12))]
    outputs = []
    for kwargs in ({}, {"enforce_eager": True}):
        with _engine(model_dir, {}, **kwargs) as llm:
            engine = llm.engine
            engine.add_request("a", None, params, prompt_token_ids=prompts[0])
            for _ in range(5):
                engine.step()
            engine.add_request("b", None, params, prompt_token_ids=prompts[1])
            done: dict[str, list[int]] = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0].token_ids
            outputs.append(done)
    assert outputs[0] == outputs[1]
