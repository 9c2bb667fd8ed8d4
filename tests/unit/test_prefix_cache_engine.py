"""Prefix caching end to end on one engine: the same greedy tokens as without it, prefixes not
computed twice (the engine's prefill counters), and vLLM's query and hit counters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mgpu import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SYSTEM = [(7 * i) % 300 + 5 for i in range(40)]  # a 40-token "system prompt": 2 full blocks


def prompts() -> list[list[int]]:
    """Prompts sharing SYSTEM, an exact repeat, one that is a prefix of another, one unrelated."""
    return [
        [*SYSTEM, 11, 12, 13],
        [*SYSTEM, 21, 22],
        [*SYSTEM, 11, 12, 13],
        SYSTEM[:20],
        [*SYSTEM, 11, 12, 13, *range(30, 60)],
        list(range(100, 140)),
    ]


def _engine(path: Path, on: bool, num_blocks: int = 48) -> LLM:
    return LLM(
        str(path),
        device="cpu",
        dtype="float32",
        num_blocks=num_blocks,
        max_model_len=128,
        enable_prefix_caching=on,
    )


@pytest.fixture(scope="module")
def engines(tiny_llama: Path) -> Iterator[tuple[LLM, LLM]]:
    on, off = _engine(tiny_llama, True), _engine(tiny_llama, False)
    yield on, off
    on.shutdown()
    off.shutdown()


def _tokens(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_tokens_identical_on_and_off(engines: tuple[LLM, LLM]) -> None:
    on, off = engines
    alone_off = [_tokens(off, [p])[0] for p in prompts()]
    alone_on = [_tokens(on, [p])[0] for p in prompts()]  # one by one: each finds the last cached
    assert alone_on == alone_off
    assert on.engine.stats.prefix_cache_hits_total > 0
    assert off.engine.stats.prefix_cache_queries_total == 0
    assert _tokens(on, prompts()) == _tokens(off, prompts()) == alone_off  # all in one batch
    for llm in (on, off):
        assert llm.engine.block_manager.num_free_blocks == 48  # every hold given back


def test_cached_prefix_is_not_recomputed(tiny_llama: Path) -> None:
    with _engine(tiny_llama, True) as llm:
        stats = llm.engine.stats
        first = [*SYSTEM, 1, 2, 3]
        _tokens(llm, [first])
        assert (stats.prompt_tokens_total, stats.prefix_cache_queries_total) == (43, 43)
        assert stats.prefix_cache_hits_total == 0
        _tokens(llm, [[*SYSTEM, 4, 5]])
        # 32 tokens (two full blocks of 16) came from the cache; only 10 were prefilled.
        assert stats.prefix_cache_hits_total == 32
        assert stats.prompt_tokens_total == 43 + 10
        assert stats.prefix_cache_queries_total == 43 + 42
        # Scoring writes over the cache's blocks, so the cache is forgotten and nothing is hit.
        llm.engine.prompt_logits(first)
        _tokens(llm, [first])
        assert stats.prefix_cache_hits_total == 32 and stats.prompt_tokens_total == 53 + 43


def test_identical_under_preemption(tiny_llama: Path) -> None:
    # 10 blocks of 16 tokens for 6 prompts of up to 85 tokens: pre-emption, resumed from the cache.
    batch = prompts()
    with _engine(tiny_llama, False, num_blocks=10) as off:
        expected = _tokens(off, batch)
    with _engine(tiny_llama, True, num_blocks=10) as on:
        assert _tokens(on, batch) == expected
        assert on.engine.stats.num_preemptions > 0
        assert on.engine.block_manager.num_free_blocks == 10
