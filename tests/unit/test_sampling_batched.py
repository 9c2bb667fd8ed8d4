"""The batched sampler: rows sampled together draw what each draws alone, from the right
distribution, with one transfer to the host per call."""

from __future__ import annotations

import pytest
import torch

from mgpu.sampling import Sampler, SamplingParams, _penalise, _SeqState, exponential_race

CPU = torch.device("cpu")

MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=5, seed=2),
    SamplingParams(temperature=0.7, top_p=0.6, seed=3, logprobs=3),
    SamplingParams(temperature=1.2, min_p=0.1, seed=4, presence_penalty=0.7),
    SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.3, logprobs=0),
]


def test_batch_rows_draw_what_they_draw_alone() -> None:
    logits = torch.randn(len(MIXED), 40, generator=torch.Generator().manual_seed(0))
    batched, alone = Sampler(40, CPU), [Sampler(40, CPU) for _ in MIXED]
    for i, params in enumerate(MIXED):
        batched.add(i, params)
        alone[i].add(i, params)
    for _ in range(6):  # penalty counts grow step by step, identically
        together = batched(list(range(len(MIXED))), logits)
        single = [alone[i]([i], logits[i : i + 1])[0] for i in range(len(MIXED))]
        assert [r.token_id for r in together] == [r.token_id for r in single]
        for a, b in zip(together, single, strict=True):
            assert a.error is None and a.top_logprobs == b.top_logprobs
            assert a.logprob == pytest.approx(b.logprob) if b.logprob is not None else True
    assert together[0].token_id == int(logits[0].argmax())
    assert len(together[3].top_logprobs) == 3 and together[5].top_logprobs is None


def test_penalties_match_the_per_row_formula() -> None:
    vocab = 12
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25),
        SamplingParams(repetition_penalty=0.5, frequency_penalty=-1.0),
    ]
    states = [_SeqState(p, vocab, CPU) for p in params]
    for row, state in enumerate(states):
        assert state.counts is not None
        state.counts[torch.tensor([row, 4, 4, 7])] += torch.tensor([1, 2, 1, 3], dtype=torch.int32)
    out = _penalise(logits.clone(), states)
    for row, (p, state) in enumerate(zip(params, states, strict=True)):
        counts, expected = state.counts, logits[row].clone()
        assert counts is not None
        for token in range(vocab):
            c = int(counts[token])
            if c:
                x = float(expected[token])
                r = p.repetition_penalty
                x = x / r if x > 0 else x * r
                expected[token] = x - p.frequency_penalty * c - p.presence_penalty
        torch.testing.assert_close(out[row], expected)


def test_both_draws_sample_the_distribution() -> None:
    """CPU draws with ``multinomial``, CUDA with the exponential race: both follow the probs."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(4, CPU)
    sampler.add(0, SamplingParams(temperature=1.0, seed=123))
    draws = [sampler([0], probs.log().unsqueeze(0))[0].token_id for _ in range(3000)]
    rows = probs.expand(3000, 4)
    generator = torch.Generator().manual_seed(5)
    seeded = exponential_race(rows[:4], [generator] * 4).tolist()
    raced = exponential_race(rows, [None] * 3000).tolist() + seeded
    for sample in (draws, raced):
        freq = torch.bincount(torch.tensor(sample), minlength=4).float() / len(sample)
        assert torch.allclose(freq, probs, atol=0.03), freq
    again = exponential_race(rows[:4], [torch.Generator().manual_seed(5)] * 4).tolist()
    assert again == seeded


def test_one_transfer_to_the_host_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a tensor's value reaches Python is counted: one ``tolist`` for the batch."""
    logits = torch.randn(len(MIXED), 40, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(40, CPU)
    for i, params in enumerate(MIXED):
        sampler.add(i, params)
    sampler(list(range(len(MIXED))), logits)  # penalty counts non-zero from here on
    calls: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _n: str = name, _f=original) -> object:
            calls.append(_n)
            return _f(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    results = sampler(list(range(len(MIXED))), logits)
    assert all(r.error is None for r in results)
    assert calls == ["tolist"]
