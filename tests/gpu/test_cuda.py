"""The same engine on a CUDA GPU (NCCL backend, one GPU per rank). Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from tests.helpers import hf_greedy, make_model

pytestmark = pytest.mark.gpu
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("cuda"), "llama3", num_key_value_heads=2)


def _hf(path: Path, dtype: torch.dtype):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.no_grad():
        logits = hf(ids).logits[0].float().cpu()
    return logits, hf_greedy(hf, PROMPT)


def test_fp32_matches_transformers_on_cuda(model_dir: Path) -> None:
    ref_logits, ref_greedy = _hf(model_dir, torch.float32)
    # No num_blocks: the KV cache is sized by the CUDA profiling pass.
    with LLM(
        str(model_dir),
        device="cuda",
        dtype="float32",
        gpu_memory_utilization=0.3,
        max_model_len=256,
        max_num_seqs=8,
    ) as llm:
        assert llm.engine.block_manager.num_blocks == 8 * 16  # capped at max_num_seqs x max_len
        assert (llm.prompt_logits(PROMPT) - ref_logits).abs().max().item() <= 1e-3
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": PROMPT}] * 4, params, use_tqdm=False)
        assert all(o.outputs[0].token_ids == ref_greedy for o in out)
        assert llm.engine.rank_reports[0].device.startswith("cuda")


def test_bf16_on_cuda(model_dir: Path) -> None:
    ref_logits, _ = _hf(model_dir, torch.bfloat16)
    with LLM(str(model_dir), device="cuda", dtype="bfloat16", num_blocks=64) as llm:
        logits = llm.prompt_logits(PROMPT)
        agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        assert agree >= 0.9
        out = llm.generate(
            "The quick", SamplingParams(temperature=0.8, seed=1, max_tokens=16), use_tqdm=False
        )
        assert out[0].outputs[0].token_ids
