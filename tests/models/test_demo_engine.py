"""The bundled demo model through the engine: the default model, stable across layouts, and the
planner's KV arithmetic equal to the allocator's (one memory formula, STYLE.md convention 10)."""

from __future__ import annotations

import pytest

from mgpu import LLM, SamplingParams
from mgpu.models.loader import demo_model_path
from mgpu.planner.plan import plan

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tp1_output():
    with LLM(device="cpu", dtype="float32") as llm:  # no model: the bundled demo model
        assert llm.engine.model_path == demo_model_path()
        out = llm.generate("The Python interpreter", GREEDY, use_tqdm=False)[0].outputs[0]
        kv = llm.engine.rank_reports[0].kv_bytes_per_token
    return out, kv


def test_demo_model_writes_english(tp1_output) -> None:
    out, _ = tp1_output
    words = out.text.split()
    assert len(words) >= 5
    assert sum(w.strip(".,;:()'\"").isalpha() for w in words) >= len(words) // 2


@pytest.mark.parametrize("tp", [2])
def test_same_text_and_planner_kv_at_tp(tp1_output, tp: int) -> None:
    out, kv_tp1 = tp1_output
    planned_tp1 = plan(str(demo_model_path()), "1x RTX 4090", tensor_parallel_size=1)
    assert planned_tp1.devices[0].kv_bytes_per_token == kv_tp1
    with LLM(device="cpu", dtype="float32", tensor_parallel_size=tp) as llm:
        assert llm.generate("The Python interpreter", GREEDY, use_tqdm=False)[0].outputs[
            0
        ].text == (out.text)
        reports = llm.engine.rank_reports
    planned = plan(str(demo_model_path()), f"{tp}x RTX 4090", tensor_parallel_size=tp)
    assert [d.kv_bytes_per_token for d in planned.devices] == [
        r.kv_bytes_per_token for r in reports
    ]
