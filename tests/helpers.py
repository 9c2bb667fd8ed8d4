"""Tiny random Hugging Face checkpoints for the tests: real files, written by ``transformers``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Tensor parallelism splits each weight matrix "
    "over several devices; pipeline parallelism gives each device a range of layers. "
    "naïve café — 你好, 世界! Ünïcödé tëxt and numbers 0123456789. "
) * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Architecture-specific config fields of each family's tiny test model.
ARCHS: dict[str, dict[str, Any]] = {
    "llama3": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": False,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    # A window shorter than the test prompts, soft-caps low enough to bend the scores.
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "head_dim": 16,
        "sliding_window": 8,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 20.0,
        "tie_word_embeddings": True,
    },
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "head_dim": 16,
        "sliding_window": 8,
        "query_pre_attn_scalar": 24,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "tie_word_embeddings": True,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "rope_theta": 1000000.0,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
    },
    # Experts narrower than the dense MLP of layer 1, top-k weights not renormalised.
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "rope_theta": 1000000.0,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "mlp_only_layers": [1],
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
    },
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS], trainer)
    return tok.to_str()


def write_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer (about 300 tokens) with a ChatML template."""
    (path / "tokenizer.json").write_text(_tokenizer_json())
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


def make_model(
    path: Path,
    arch: str = "llama3",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Write a random-weight HF checkpoint of a small config to ``path``; returns ``path``.

    Args:
        path: output directory (created).
        arch: a key of ``ARCHS`` (``llama3``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ...).
        seed: weight initialisation seed.
        dtype: dtype the weights are saved in.
        **overrides: config fields (``num_key_value_heads``, ``vocab_size``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 320,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 0,
        "bos_token_id": None,
        **ARCHS[arch],
        **overrides,
    }
    if arch == "qwen2":
        fields.setdefault("attention_bias", True)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so logits are well spread
            p.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0).add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(path)
    write_tokenizer(path)
    return path


def hf_greedy(model: Any, ids: list[int], new_tokens: int = 32) -> list[int]:
    """``new_tokens`` greedy tokens of a transformers model after ``ids`` (EOS not stopping it)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def greedy_continuations(model: Any, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` by a transformers (or peft) model of the demo model's
    tokenizer: exactly ``max_tokens`` tokens each, EOS generated like any token, not stopping."""
    from transformers import AutoTokenizer

    from mgpu.models.loader import demo_model_path

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    model.eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids  # (1, prompt_len)
        with torch.no_grad():
            gen = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None
            )  # (1, prompt_len + max_tokens)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def engine_run(
    path: str | Path | None,
    prompts: list[list[int]],
    max_tokens: int,
    follow: list[list[int]] | None = None,
    **engine: Any,
) -> tuple[list[list[int]], list[torch.Tensor], list[dict[str, Any]]]:
    """What one CPU engine on ``path`` gives: the greedy tokens of each token-id prompt, the
    logits (T, vocab) of each prompt followed by ``follow``'s tokens (default: its own), and its
    ``layout()`` rows.

    Args:
        path: the model (None: the bundled demo).
        prompts: token-id prompts.
        max_tokens: greedy tokens per prompt (EOS not stopping them).
        follow: the continuations to score instead of the engine's own.
        engine: further ``LLM`` keywords (layout, dtype, quantization, ...).
    """
    from mgpu import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    model = None if path is None else str(path)
    with LLM(model, device="cpu", **engine) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        seqs = [p + t for p, t in zip(prompts, follow or tokens, strict=True)]
        return tokens, [llm.prompt_logits(s) for s in seqs], llm.layout()


def assert_argmax_where_clear(
    ref: torch.Tensor, got: torch.Tensor, positions: slice = slice(None)
) -> int:
    """``got`` picks ``ref``'s greedy token wherever ``ref``'s top-two margin exceeds twice
    their largest difference at that position (rounding cannot flip the choice there).

    Args:
        ref: (T, vocab) reference logits.
        got: (T, vocab) logits to check.
        positions: the rows to check (default: all).

    Returns:
        How many positions were that clear (a caller asserts enough were, so the check is not
        vacuous).
    """
    r, g = ref[positions], got[positions]
    noise = (g - r).abs().amax(dim=-1)  # (positions,)
    top2 = r.topk(2, dim=-1).values  # (positions, 2)
    clear = (top2[:, 0] - top2[:, 1]) > 2 * noise
    assert (g.argmax(-1) == r.argmax(-1))[clear].all()
    return int(clear.sum())
