"""Shared pieces of the quantization tests: held-out text in the demo model's style and the fp32
demo model's perplexity on it, the reference every quantized format is held to."""

from __future__ import annotations

import math

import pytest
import torch

from mgpu import LLM

#: Text in the demo model's style (Python documentation) but not from its training set.
HELD_OUT = (
    "Return a new list containing all items from the iterable in ascending order. A custom key "
    "function can be supplied to customize the sort order, and the reverse flag can be set to "
    "request the result in descending order. If the object is a string, the return value is the "
    "same object. The default value is None, which means that the function is called with no "
    "arguments and returns an empty dictionary."
)


@pytest.fixture(scope="session")
def held_out_ids() -> list[int]:
    """:data:`HELD_OUT` in the demo model's tokens."""
    from transformers import AutoTokenizer

    from mgpu.models.loader import demo_model_path

    return AutoTokenizer.from_pretrained(demo_model_path())(HELD_OUT).input_ids


def perplexity(llm: LLM, ids: list[int]) -> float:
    """The engine's perplexity on the token ids ``ids`` (each token predicted from those before)."""
    logp = torch.log_softmax(llm.prompt_logits(ids)[:-1].double(), dim=-1)  # (T-1, vocab)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    return math.exp(nll)


@pytest.fixture(scope="session")
def fp32_perplexity(held_out_ids: list[int]) -> float:
    """The demo model's perplexity on :data:`HELD_OUT` in fp32: one engine for every format."""
    with LLM(None, device="cpu", dtype="float32", num_blocks=64) as llm:
        return perplexity(llm, held_out_ids)
