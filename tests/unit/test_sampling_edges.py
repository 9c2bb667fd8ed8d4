"""Values at the edge of what the sampler computes: each is rejected naming its field, or sampled
as what it means; a row that cannot be sampled fails alone, the rest of the batch is unaffected."""

from __future__ import annotations

import math

import pytest
import torch

from mgpu.sampling import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    SAMPLER_FAULT_ENV,
    Sampler,
    SamplingParams,
    _truncate,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", 1e300),
        ("top_p", math.nan),
        ("min_p", math.nan),
        ("presence_penalty", math.inf),
        ("frequency_penalty", -math.inf),
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 1e300),
        ("repetition_penalty", math.nan),
        ("n", True),
        ("seed", 1.5),
        ("top_k", -(10**20)),
        ("logprobs", 10**20),
        ("stop", [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
        ("stop", ["x" * (MAX_STOP_LENGTH + 1)]),
        ("stop", ["\ud800"]),
        ("stop_token_ids", list(range(1000))),
    ],
)
def test_uncomputable_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field  # type: ignore[attr-defined]


def test_seeds_of_any_size_are_reduced() -> None:
    """Seeds are taken modulo 2**64: 2**64 + 7 samples exactly as 7, negative seeds work."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))

    def draw(seed: int) -> list[int]:
        sampler = Sampler(50, CPU)
        sampler.add(0, SamplingParams(seed=seed))
        return [sampler([0], logits)[0].token_id for _ in range(8)]

    assert draw(2**64 + 7) == draw(7)
    assert draw(-1) == draw(2**64 - 1)
    assert draw(10**40) == draw(10**40 % 2**64)


def test_top_k_beyond_the_vocabulary_keeps_everything() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.equal(_truncate(probs, [SamplingParams(top_k=10**20)]), probs)


def test_underflowing_top_p_keeps_the_top_token() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    kept = _truncate(probs, [SamplingParams(top_p=1e-46)])  # 0 in float32
    assert kept.tolist() == [[0.0, 1.0, 0.0]]
    kept = _truncate(probs, [SamplingParams(min_p=1e-46)])
    assert torch.allclose(kept, probs)


def test_extreme_but_valid_values_sample() -> None:
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(32, CPU)
    edge = [
        SamplingParams(temperature=1e-5 * 1.01, seed=1),  # just above greedy: a sharp softmax
        SamplingParams(temperature=1e4, seed=2),  # nearly uniform
        SamplingParams(repetition_penalty=1e-2, temperature=0),
        SamplingParams(repetition_penalty=1e2, logprobs=20, seed=3),
    ]
    for i, p in enumerate(edge):
        sampler.add(i, p)
    for _ in range(3):
        results = sampler([0, 1, 2, 3], logits)
        assert all(r.error is None and 0 <= r.token_id < 32 for r in results)
    assert results[0].token_id == int(logits[0].argmax())


def test_nan_row_fails_alone() -> None:
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    logits[1, 5] = math.nan
    sampler = Sampler(16, CPU)
    for i in range(3):
        sampler.add(i, SamplingParams(temperature=0))
    results = sampler([0, 1, 2], logits)
    assert results[1].error is not None and "NaN" in results[1].error
    assert [results[0].token_id, results[2].token_id] == logits[[0, 2]].argmax(-1).tolist()
    assert results[0].error is None and results[2].error is None


def test_a_failing_sequence_leaves_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test-only fault raises for one seed; the batch falls back to sampling row by row."""
    monkeypatch.setenv(SAMPLER_FAULT_ENV, "99")
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(16, CPU)
    sampler.add(0, SamplingParams(temperature=0))
    sampler.add(1, SamplingParams(temperature=0, seed=99))
    sampler.add(2, SamplingParams(temperature=0.7, seed=5, logprobs=2))
    results = sampler([0, 1, 2], logits)
    assert results[1].error is not None and SAMPLER_FAULT_ENV in results[1].error
    assert results[0].token_id == int(logits[0].argmax()) and results[0].error is None
    alone = Sampler(16, CPU)
    alone.add(2, SamplingParams(temperature=0.7, seed=5, logprobs=2))
    assert results[2] == alone([2], logits[2:3])[0]


def test_retried_rows_draw_what_they_would_have() -> None:
    """Row 1 fails after row 0 has drawn from its seeded stream: the retry rewinds the stream, so
    row 0 gets the token it gets without its failing neighbour, and its penalty counts once."""
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    logits[1, 3] = math.inf  # softmax turns it into NaN: multinomial raises
    params = SamplingParams(temperature=0.9, seed=11, presence_penalty=0.5)
    sampler = Sampler(16, CPU)
    sampler.add(0, params)
    sampler.add(1, SamplingParams(temperature=0.9))
    alone = Sampler(16, CPU)
    alone.add(0, params)
    for _ in range(3):
        results = sampler([0, 1], logits)
        assert results[1].error is not None and "sampling failed" in results[1].error
        assert results[0] == alone([0], logits[:1])[0]
    assert torch.equal(sampler.states[0].counts, alone.states[0].counts)


def test_a_sequence_that_cannot_be_added_fails_alone() -> None:
    broken = SamplingParams(seed=1)
    broken.seed = "not a number"  # type: ignore[assignment]  # past validation, as a bug would
    sampler = Sampler(16, CPU)
    sampler.add(0, SamplingParams(temperature=0))
    sampler.add(1, broken)
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    results = sampler([0, 1], logits)
    assert results[1].error is not None and "cannot set up sampling" in results[1].error
    assert results[0].error is None and results[0].token_id == int(logits[0].argmax())
    sampler.remove(1)
    assert not sampler.failed
