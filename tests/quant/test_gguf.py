"""GGUF files written here the way llama.cpp's converter lays them out, loaded by mgpu and
compared with ``transformers`` running the weights the file holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, AutoTokenizer

from mgpu import LLM, SamplingParams
from mgpu.layers.quantization.gguf import decode_blocks, to_packed
from mgpu.models.gguf import gguf_model_config
from tests.helpers import assert_argmax_where_clear, make_model
from tests.quant.conftest import perplexity
from tests.quant.gguf_files import encode, write_gguf

PROMPT = list(range(3, 40))
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_decoders_match_the_gguf_package(qtype: T) -> None:
    """mgpu's torch decoders give the ``gguf`` package's dequantisation bit for bit, on blocks
    packed by this test's packers and on random bytes; the int4 conversion is exact too."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (16, 512)).astype(np.float32)
    packed = encode(w, qtype)
    ref = quants.dequantize(packed, qtype)
    got = decode_blocks(torch.from_numpy(packed), qtype)
    assert np.array_equal(got.to_float().numpy(), ref)
    # The packers are right: the blocks reproduce w to within each type's resolution.
    bits = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_K: 4, T.Q5_K: 5, T.Q6_K: 6}[qtype]
    assert np.abs(ref - w).max() <= 3 * np.abs(w).max() / 2**bits
    noise = rng.integers(0, 256, (4, 2 * GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    noise.reshape(4, 2, -1)[..., :2] = np.array([0.01], dtype=np.float16).view(
        np.uint8
    )  # finite fp16 d
    if qtype == T.Q6_K:
        noise.reshape(4, 2, -1)[..., -2:] = np.array([0.01], dtype=np.float16).view(np.uint8)
    ref_noise = quants.dequantize(noise, qtype)
    assert np.array_equal(
        decode_blocks(torch.from_numpy(noise), qtype).to_float().numpy(), ref_noise
    )
    if qtype in (T.Q4_0, T.Q4_K):
        int4 = to_packed(got, qtype)
        assert torch.allclose(int4.dequantize(), torch.from_numpy(ref), atol=1e-5)


def _reference(model_dir: Path, held: dict[str, torch.Tensor]):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.load_state_dict(held, strict=False)
    if hf.config.tie_word_embeddings:
        hf.tie_weights()
    with torch.no_grad():
        return hf(torch.tensor([PROMPT])).logits[0]  # (T, vocab)


def _logits(path: Path, tp: int = 1, pp: int = 1, dtype: str = "float32") -> torch.Tensor:
    with LLM(
        str(path),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        device="cpu",
        dtype=dtype,
        num_blocks=64,
    ) as llm:
        return llm.prompt_logits(PROMPT)


#: float32 logits (|x| up to ~7) against transformers: oneDNN's products on CPU sum in another
#: order than transformers' MKL ones, 1e-4 apart at most seen (a relative 2e-5).
F32_ATOL = 3e-4


@pytest.mark.parametrize(
    ("arch", "gguf_arch"),
    [("llama3", "llama"), ("mistral", "llama"), ("qwen2", "qwen2")],
    ids=["llama", "mistral", "qwen2"],
)
def test_f32_file_matches_transformers(tmp_path: Path, arch: str, gguf_arch: str) -> None:
    """Llama-style files carry the converter's q/k permutation; Qwen2 has q/k/v biases and a
    tied LM head. Mistral checkpoints are converted under the llama architecture."""
    model_dir = make_model(tmp_path / "hf", arch, rope_scaling=None, **SHAPE)
    held = write_gguf(model_dir, tmp_path / "m.gguf", T.F32, arch=gguf_arch)
    ref = _reference(model_dir, held)
    assert (_logits(tmp_path / "m.gguf") - ref).abs().max() <= F32_ATOL


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1+ files carry llama3 RoPE scaling as a ``rope_freqs`` factor tensor."""
    model_dir = make_model(tmp_path / "hf", "llama3", **SHAPE)
    held = write_gguf(model_dir, tmp_path / "m.gguf", T.F32)
    scaling = gguf_model_config(tmp_path / "m.gguf").rope_scaling
    assert scaling is not None and scaling.factor == 8.0
    assert scaling.original_max_position_embeddings == 64
    assert (_logits(tmp_path / "m.gguf") - _reference(model_dir, held)).abs().max() <= F32_ATOL


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("gguf_llama"), "llama3", rope_scaling=None, **SHAPE)


QUANT_CASES = {
    "F16": (T.F16, None),
    "Q8_0": (T.Q8_0, None),
    "Q4_0": (T.Q4_0, None),
    "Q4_K": (T.Q4_K, None),
    "Q5_K": (T.Q5_K, None),
    "Q6_K": (T.Q6_K, None),
    # Q4_K_M keeps v, down and the LM head at Q6_K: layers mix int4 and int8 parts.
    "Q4_K_M": (T.Q4_K, {"v_proj": T.Q6_K, "down_proj": T.Q6_K, "lm_head": T.Q6_K}),
}


@pytest.mark.parametrize("case", sorted(QUANT_CASES))
def test_quantized_file_stays_close(tmp_path: Path, llama_dir: Path, case: str) -> None:
    """Against transformers on the file's own (dequantised) weights. An fp32 model runs the exact
    dequantising path, so F16 and the int4-converted types (Q4_0, Q4_K) match as closely as an
    F32 file; Q8_0/Q5_K/Q6_K are requantized to int8 with one scale per row, which adds about
    one int8 step of noise per weight (this random model magnifies it; see the demo model's
    perplexity below for a trained one)."""
    qtype, overrides = QUANT_CASES[case]
    held = write_gguf(llama_dir, tmp_path / "m.gguf", qtype, overrides)
    ref = _reference(llama_dir, held)
    got = _logits(tmp_path / "m.gguf", dtype="float32")
    if case in ("F16", "Q4_0", "Q4_K"):
        assert (got - ref).abs().max() <= 1e-3
    else:
        assert (got - ref).abs().max() <= 0.1 * ref.abs().max()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


def test_q4_k_tp2_and_pp2_agree_with_unsharded(tmp_path: Path, llama_dir: Path) -> None:
    """TP=2 cuts o_proj's 256 columns into 128-column halves, inside a Q4_K super-block: each rank
    decodes the super-blocks its columns touch and keeps its 32-element sub-blocks."""
    write_gguf(llama_dir, tmp_path / "m.gguf", T.Q4_K)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = None
    for tp, pp in [(1, 1), (1, 2), (2, 1)]:
        with LLM(
            str(tmp_path / "m.gguf"),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            device="cpu",
            dtype="float32",
            num_blocks=64,
        ) as llm:
            tokens = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
            seq = PROMPT + tokens[0].outputs[0].token_ids
            logits = llm.prompt_logits(ref[0] if ref else seq)
        if ref is None:
            ref = (seq, logits)
            continue
        if pp == 2:  # the same kernels on the same shards
            assert seq == ref[0]
        assert assert_argmax_where_clear(ref[1], logits) >= 0.5 * len(ref[0])


def test_config_and_tokenizer_from_metadata(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path / "hf", "qwen2", **SHAPE)
    write_gguf(model_dir, tmp_path / "m.gguf", T.Q8_0)
    config = gguf_model_config(tmp_path / "m.gguf")
    assert config.architecture == "Qwen2ForCausalLM"
    assert config.tie_word_embeddings and config.attention_bias
    assert config.torch_dtype == "bfloat16"
    hf = AutoTokenizer.from_pretrained(model_dir)
    with LLM(str(tmp_path / "m.gguf"), device="cpu", num_blocks=64) as llm:
        tok = llm.get_tokenizer()
        text = "The quick brown fox: naïve café, 你好 <|im_start|> 0123"
        assert tok(text).input_ids == hf(text).input_ids
        messages = [{"role": "user", "content": "What does json.dumps do?"}]
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert llm.engine.chat_prompt_ids(messages) == hf(expected).input_ids
        assert llm.engine.eos_token_ids == {0}


def test_demo_model_perplexity(
    tmp_path: Path, fp32_perplexity: float, held_out_ids: list[int]
) -> None:
    """The trained demo model converted to GGUF: held-out perplexity within 1% of fp32 for the
    8- and 6-bit types and 5% for the 4-bit ones, in bf16 (the int8/int4 kernels' path)."""
    from mgpu.models.loader import demo_model_path

    cases = {
        "Q8_0": (T.Q8_0, None, 0.01),
        "Q6_K": (T.Q6_K, None, 0.01),
        "Q4_0": (T.Q4_0, None, 0.05),
    }
    cases["Q4_K_M"] = (T.Q4_K, {"v_proj": T.Q6_K, "down_proj": T.Q6_K}, 0.05)
    for name, (qtype, overrides, bound) in cases.items():
        write_gguf(demo_model_path(), tmp_path / f"{name}.gguf", qtype, overrides)
        gguf = str(tmp_path / f"{name}.gguf")
        with LLM(gguf, device="cpu", dtype="bfloat16", num_blocks=64) as llm:
            ppl = perplexity(llm, held_out_ids)
        assert abs(ppl / fp32_perplexity - 1) <= bound, (name, ppl, fp32_perplexity)
