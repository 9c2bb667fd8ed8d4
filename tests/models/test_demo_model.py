"""Checks of the bundled demo model (``src/mgpu/demo_model``, built by scripts/train_demo_model.py).

These run against the shipped files in a few seconds: size budget, loading with transformers,
tokenizer round trip, chat template, and a greedy continuation that looks like English.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mgpu

DEMO_DIR = Path(mgpu.__file__).parent / "demo_model"
MAX_BYTES = 25 * 1000 * 1000
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The demo tokenizer, loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def model() -> Any:
    """The demo model in float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()


def test_files_present_and_small() -> None:
    names = {p.name for p in DEMO_DIR.iterdir() if p.is_file()}
    assert names >= EXPECTED_FILES
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"demo model is {total / 1e6:.1f} MB"


def test_config_shape() -> None:
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_attention_heads"] == 8
    assert config["num_key_value_heads"] == 4
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 1024
    assert config["torch_dtype"] in {"float32", "bfloat16"}


def test_checkpoint_uses_hf_names() -> None:
    from safetensors import safe_open

    with safe_open(str(DEMO_DIR / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys
    assert "model.norm.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "lm_head.weight" not in keys  # tied to the embeddings


def test_loads_in_transformers(model: Any, tokenizer: Any) -> None:
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in config["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in config["eos_token_id"]


def test_tokenizer_round_trips_unicode(tokenizer: Any) -> None:
    text = "naïve café — 你好"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos[0] == tokenizer.bos_token_id
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_chat_template_renders(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is a list?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|>"
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is a list?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5


def test_greedy_continuation_is_english(model: Any, tokenizer: Any) -> None:
    enc = tokenizer("The Python", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "empty continuation"
    letters = sum(c.isascii() and c.isalpha() for c in text)
    spaces = sum(c.isspace() for c in text)
    assert letters >= 8, repr(text)
    assert (letters + spaces) / len(text) >= 0.7, repr(text)
