"""Sampling parameters, the sampler's truncation rules, seeds, penalties and logprobs."""

from __future__ import annotations

import pytest
import torch

from mgpu.sampling import Sampler, SamplingParams, SamplingParamsError, _truncate


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("n", 0),
        ("max_tokens", -1),
        ("min_p", 2.0),
        ("top_k", -5),
        ("logprobs", 21),
        ("presence_penalty", 3.0),
    ],
)
def test_invalid_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
    assert field in str(info.value)


def test_truncation_rules() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert _truncate(probs, [SamplingParams(top_k=2)]).tolist() == [[0.625, 0.375, 0.0, 0.0]]
    kept = _truncate(probs, [SamplingParams(top_p=0.8)])[0]
    assert (kept > 0).tolist() == [True, True, False, False]
    kept = _truncate(probs, [SamplingParams(min_p=0.5)])[0]  # threshold 0.25
    assert (kept > 0).tolist() == [True, True, False, False]
    kept = _truncate(probs, [SamplingParams(top_p=0.1)])[0]  # the top token always survives
    assert kept.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_greedy_and_seeded_sampling() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    sampler = Sampler(50, torch.device("cpu"))
    sampler.add(0, SamplingParams(temperature=0))
    sampler.add(1, SamplingParams(temperature=1.0, seed=7))
    sampler.add(2, SamplingParams(temperature=1.0, seed=7))
    first = [r.token_id for r in sampler([0, 1, 2], logits)]
    assert first[0] == int(logits[0].argmax())
    # Same seed, same logits -> same token; streams continue independently per sequence.
    again = Sampler(50, torch.device("cpu"))
    again.add(1, SamplingParams(temperature=1.0, seed=7))
    assert again([1], logits[1:2])[0].token_id == first[1]


def test_penalties_and_logprobs() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    sampler = Sampler(3, torch.device("cpu"))
    sampler.add(0, SamplingParams(temperature=0, presence_penalty=1.0, logprobs=2))
    first = sampler([0], logits)[0]
    assert first.token_id == 0
    assert first.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[0]))
    assert [t for t, _ in first.top_logprobs] == [0, 1]
    # Token 0 is now penalised by 1.0, so token 1 wins.
    assert sampler([0], logits)[0].token_id == 1
