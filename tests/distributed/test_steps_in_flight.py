"""Steps in flight: PP=2 and TP=2 x PP=2 with 8 concurrent sequences, greedy as transformers.

With ``pp_size`` micro-batches in flight, every stage works at once; the engine collects the
oldest, sends the next out, and post-processes meanwhile. The tokens must not change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from tests.helpers import make_model

#: Eight prompts of different lengths, so micro-batches mix prefill and decode.
PROMPTS = [list(range(3, 3 + n)) for n in (1, 5, 9, 13, 17, 21, 25, 29)]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """A 4-layer model and transformers' greedy continuation of each prompt."""
    path = make_model(tmp_path_factory.mktemp("inflight"), "llama3", num_hidden_layers=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, [_argmax_continuation(hf, ids) for ids in PROMPTS]


def _argmax_continuation(hf: AutoModelForCausalLM, ids: list[int]) -> list[int]:
    """Greedy tokens by repeated full forwards (EOS included, as the engine's ``ignore_eos``)."""
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(ids) :]


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_concurrent_sequences_match_transformers(reference, tp: int, pp: int) -> None:
    path, expected = reference
    with LLM(
        str(path),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        device="cpu",
        dtype="float32",
        num_blocks=64,
        max_steps_in_flight=pp,  # explicit: on a machine without a spare core the default is 1
    ) as llm:
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        for i, ids in enumerate(PROMPTS):
            engine.add_request(str(i), None, params, prompt_token_ids=ids)
        most_in_flight = 0
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            most_in_flight = max(most_in_flight, engine.executor.num_in_flight)
        assert [done[str(i)] for i in range(len(PROMPTS))] == expected
        # One micro-batch per stage stayed in flight while another was post-processed.
        assert most_in_flight == pp - 1 or most_in_flight == pp


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["one-ahead", "lookahead"])
def test_one_stage_overlaps_post_processing(reference, async_scheduling: bool) -> None:
    """PP=1: step N+1 is already submitted when step N's outputs come back to the caller, and
    with async scheduling step N+2 too, which decodes the token step N+1 samples."""
    path, expected = reference
    with LLM(
        str(path), device="cpu", dtype="float32", num_blocks=64, async_scheduling=async_scheduling
    ) as llm:
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        engine.add_request("0", None, params, prompt_token_ids=PROMPTS[3])
        in_flight = []
        while engine.has_unfinished_requests():
            outs = engine.step()
            in_flight.append(engine.executor.num_in_flight)
        assert outs[0].outputs[0].token_ids == expected[3]
        if async_scheduling:
            # No look-ahead behind the step that samples the last token.
            assert in_flight == [2] * (NEW_TOKENS - 2) + [1, 0]
        else:
            assert in_flight == [1] * (NEW_TOKENS - 1) + [0]
