"""Incremental detokenisation and stop strings through the engine's own helpers."""

from __future__ import annotations

from transformers import AutoTokenizer

from mgpu.engine.detokenizer import detokenize_incrementally
from mgpu.engine.llm_engine import _pending_stop_prefix
from mgpu.engine.sequence import Sequence
from mgpu.sampling import SamplingParams


def test_never_splits_multibyte_characters(tiny_llama) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "naïve café — 你好, 世界!"
    ids = tok(text).input_ids
    seq = Sequence(0, "r", 0, tok("x").input_ids, SamplingParams(), 100)
    deltas = []
    for token in ids:
        seq.output_token_ids.append(token)
        deltas.append(detokenize_incrementally(tok, seq))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_pending_stop_prefix() -> None:
    assert _pending_stop_prefix("hello wor", ["world"]) == 3
    assert _pending_stop_prefix("hello", ["xyz"]) == 0
    assert _pending_stop_prefix("ab", ["abc", "bcd"]) == 2
