"""Async scheduling: step N+1 is submitted before step N returns, its decoding sequences fed the
tokens step N samples, which the workers fill in (TP=1, and TP=2 where the output rank
broadcasts them). Nothing the caller sees may change: tokens, texts, finish reasons, seeded
draws, pre-emption and aborts are the same as one step at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from mgpu.engine.llm_engine import RequestOutput
from tests.helpers import make_model

#: Prompts of different lengths, so steps mix prefills with looked-ahead decodes.
PROMPTS = [list(range(3, 3 + n)) for n in (1, 6, 11, 17, 23, 29)]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """A 2-layer GQA model and transformers' greedy continuation of each prompt."""
    path = make_model(
        tmp_path_factory.mktemp("async"), "llama3", num_hidden_layers=2, num_key_value_heads=2
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for ids in PROMPTS:
            tokens = list(ids)
            for _ in range(NEW_TOKENS):
                tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
            expected.append(tokens[len(ids) :])
    return path, expected


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> tuple[dict, int]:
    """Add ``requests`` at once and step until done; returns the final outputs by request id and
    the most steps that were in flight after a step."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, None, params, prompt_token_ids=ids)
    done: dict[str, RequestOutput] = {}
    most = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        most = max(most, engine.executor.num_in_flight)
    return done, most


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_lookahead_matches_transformers(reference, tp: int) -> None:
    path, expected = reference
    with LLM(str(path), tensor_parallel_size=tp, device="cpu", dtype="float32") as llm:
        engine = llm.engine
        assert engine.async_scheduling
        greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        done, most = _run(engine, {str(i): (ids, greedy) for i, ids in enumerate(PROMPTS)})
        assert [done[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == expected
        assert most == 2  # a looked-ahead step was submitted behind the one in flight
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _mixed_requests(expected: list[list[int]]) -> dict[str, tuple[list[int], SamplingParams]]:
    """Requests that end every way, some on the token a looked-ahead step already feeds; all but
    the first two have prompts of 28 distinct tokens, which cross into a third block while they
    decode."""
    stop_token = expected[2][4]
    prompt = [list(range(20 + 40 * i, 48 + 40 * i)) for i in range(6)]
    greedy = {"temperature": 0, "ignore_eos": True}
    return {
        "stop-id": (
            PROMPTS[2],
            SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=[stop_token], **greedy),
        ),
        "one-token": (PROMPTS[5], SamplingParams(max_tokens=1, **greedy)),
        "greedy": (prompt[0], SamplingParams(max_tokens=9, **greedy)),
        "stop-str": (prompt[1], SamplingParams(max_tokens=NEW_TOKENS, stop=["r9"], **greedy)),
        "seeded-n": (
            prompt[2],
            SamplingParams(temperature=1.0, top_k=20, seed=7, n=3, max_tokens=10, ignore_eos=True),
        ),
        "penalty": (
            prompt[3],
            SamplingParams(repetition_penalty=1.5, max_tokens=NEW_TOKENS, **greedy),
        ),
        "logprobs": (prompt[4], SamplingParams(max_tokens=5, logprobs=2, **greedy)),
        "long": (prompt[5], SamplingParams(max_tokens=NEW_TOKENS, **greedy)),
    }


def _summary(done: dict[str, RequestOutput]) -> dict[str, list[tuple]]:
    return {
        rid: [
            (o.token_ids, o.text, o.finish_reason, o.stop_reason, o.cumulative_logprob)
            for o in out.outputs
        ]
        for rid, out in done.items()
    }


def test_same_outputs_as_one_step_at_a_time(reference) -> None:
    """Stops on ids and strings, seeded n > 1, penalties, logprobs and a small cache that
    pre-empts: async scheduling changes none of it, and frees every block."""
    path, expected = reference
    results = {}
    for async_scheduling in (True, False):
        # 6 blocks of 16 tokens cannot hold all ten sequences at once: pre-emption.
        with LLM(
            str(path),
            device="cpu",
            dtype="float32",
            num_blocks=6,
            max_model_len=64,
            async_scheduling=async_scheduling,
        ) as llm:
            engine = llm.engine
            done, most = _run(engine, _mixed_requests(expected))
            assert most == (2 if async_scheduling else 1)
            assert engine.stats.num_preemptions > 0
            assert engine.block_manager.num_free_blocks == 6
            results[async_scheduling] = _summary(done)
    assert results[True] == results[False]
    stop_id = results[True]["stop-id"][0]
    assert stop_id[2] == "stop" and stop_id[0] == expected[2][:5]
    stop_str = results[True]["stop-str"][0]
    assert stop_str[2:4] == ("stop", "r9") and "r9" not in stop_str[1]


def test_abort_with_a_lookahead_in_flight(reference) -> None:
    """A request aborted while its looked-ahead step is in flight frees its blocks; the other
    request goes on, token for token as transformers."""
    path, expected = reference
    with LLM(str(path), device="cpu", dtype="float32") as llm:
        engine = llm.engine
        greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        engine.add_request("keep", None, greedy, prompt_token_ids=PROMPTS[4])
        engine.add_request("drop", None, greedy, prompt_token_ids=PROMPTS[5])
        for _ in range(3):
            engine.step()
        assert engine.executor.num_in_flight == 2
        engine.abort_request("drop")
        done, _ = _run(engine, {})
        assert done["keep"].outputs[0].token_ids == expected[4]
        assert "drop" not in done
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
