"""Generation features end to end on one engine: stops, seeds, n, pre-emption, long prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgpu import LLM, SamplingParams
from mgpu.engine.llm_engine import PromptError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama: Path):
    # 12 blocks x 16 tokens: too small for 8 sequences of ~40 tokens at once, so it pre-empts.
    with LLM(
        str(tiny_llama), device="cpu", dtype="float32", num_blocks=12, max_model_len=128
    ) as llm:
        yield llm


def prompts(n: int) -> list[dict]:
    return [{"prompt_token_ids": list(range(10 + i, 26 + i))} for i in range(n)]


def test_batch_equals_alone_even_with_preemption(llm: LLM) -> None:
    alone = [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts(8)]
    before = llm.engine.stats.num_preemptions
    together = llm.generate(prompts(8), GREEDY, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > before
    assert [o.outputs[0].token_ids for o in together] == alone
    assert llm.engine.block_manager.num_free_blocks == 12


def test_stop_strings_and_token_ids(llm: LLM) -> None:
    full = llm.generate("The quick brown", GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[5:8]
    cut = llm.generate(
        "The quick brown",
        SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0]
    out = cut.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.find(stop)]
    token = full.token_ids[3]
    out = llm.generate(
        "The quick brown",
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[token], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(token) + 1]
    assert out.stop_reason == token


def test_seeded_sampling_is_reproducible_and_n_works(llm: LLM) -> None:
    params = SamplingParams(
        temperature=1.0, top_p=0.9, seed=123, max_tokens=16, n=3, ignore_eos=True
    )
    a = llm.generate("Tensor", params, use_tqdm=False)[0]
    b = llm.generate("Tensor", params, use_tqdm=False)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_prompt_too_long_and_length_cap(llm: LLM) -> None:
    with pytest.raises(PromptError, match="130 tokens but --max-model-len is 128"):
        llm.generate([{"prompt_token_ids": [5] * 130}], GREEDY, use_tqdm=False)
    out = llm.generate(
        [{"prompt_token_ids": [5] * 120}],
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_logprobs(llm: LLM) -> None:
    out = llm.generate(
        "quick",
        SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, result in zip(out.token_ids, out.logprobs, strict=True):
        assert result.token_id == token and result.top_logprobs[0][0] == token
        assert result.logprob <= 0
    assert out.cumulative_logprob == pytest.approx(sum(r.logprob for r in out.logprobs))


def test_chat_uses_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "The quick brown fox"}]
    ids = llm.engine.chat_prompt_ids(messages)
    expected = llm.get_tokenizer()(
        "<|im_start|>user\nThe quick brown fox<|im_end|>\n<|im_start|>assistant\n"
    ).input_ids
    assert ids == expected
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert out.prompt_token_ids == ids and len(out.outputs[0].token_ids) == 5


def test_prompt_tokens_counted_once_despite_preemption(llm: LLM) -> None:
    stats = llm.engine.stats
    before = (stats.prompt_tokens_total, stats.recomputed_tokens_total, stats.num_preemptions)
    llm.generate(prompts(8), GREEDY, use_tqdm=False)
    assert stats.prompt_tokens_total - before[0] == 8 * 16
    preemptions = stats.num_preemptions - before[2]
    recomputed = stats.recomputed_tokens_total - before[1]
    assert preemptions > 0
    # Each resume recomputes the prompt and the tokens generated so far, but never the newest one.
    assert preemptions * 16 <= recomputed <= preemptions * (16 + 24 - 1)


def test_compiled_decode_matches_eager(llm: LLM, tiny_llama: Path) -> None:
    eager = llm.generate(prompts(3), GREEDY, use_tqdm=False)
    with LLM(
        str(tiny_llama),
        device="cpu",
        dtype="float32",
        num_blocks=12,
        max_model_len=128,
        compile_decode=True,
    ) as compiled:
        out = compiled.generate(prompts(3), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in eager]
