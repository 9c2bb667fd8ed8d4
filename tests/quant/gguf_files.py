"""GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` lays them out, from a tiny
random Hugging Face checkpoint, with K-quant blocks packed here from ggml's published layouts.

``write_gguf`` also returns the weights the file really holds (each tensor dequantised by the
``gguf`` package's own decoder, and un-permuted), so a test can run ``transformers`` on exactly
those weights as the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from safetensors.torch import load_file

_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    """llama.cpp's name of a HF tensor."""
    if hf in _NAMES:
        return _NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER[module]}.{kind}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The converter's q/k row permutation (``LlamaModel.permute``)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(..., 8) six-bit scales and mins -> Q4_K/Q5_K's 12 bytes (``get_scale_min_k4`` inverse)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    return out


def _k_quant(w: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32-element sub-block ``w ~ d*sc*q - dmin*m`` with six-bit sc, m and q < levels."""
    x = w.reshape(w.shape[0], -1, 8, 32).astype(np.float64)  # (N, nb, 8, 32)
    lo = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - lo) / (levels - 1)
    d = np.maximum(scale.max(-1), 1e-8) / 63  # (N, nb)
    dmin = np.maximum((-lo).max(-1), 1e-8) / 63
    d, dmin = d.astype(np.float16).astype(np.float64), dmin.astype(np.float16).astype(np.float64)
    sc = np.clip(np.round(scale / d[..., None]), 1, 63)
    m = np.clip(np.round(-lo / dmin[..., None]), 0, 63)
    q = np.round((x + (dmin[..., None] * m)[..., None]) / (d[..., None] * sc)[..., None])
    return d, dmin, sc, m, np.clip(q, 0, levels - 1).astype(np.uint8)


def pack_q4_k(w: np.ndarray) -> np.ndarray:
    """(N, K) float -> (N, K/256*144) Q4_K bytes."""
    d, dmin, sc, m, q = _k_quant(w, 16)
    q = q.reshape(*q.shape[:2], 4, 2, 32)  # chunk c holds sub-blocks 2c (low), 2c+1 (high)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(*q.shape[:2], 128)
    blocks = np.concatenate(
        [_f16(d[..., None]), _f16(dmin[..., None]), _pack_k_scales(sc, m), qs], -1
    )
    return blocks.reshape(w.shape[0], -1)


def pack_q5_k(w: np.ndarray) -> np.ndarray:
    """(N, K) float -> (N, K/256*176) Q5_K bytes."""
    d, dmin, sc, m, q = _k_quant(w, 32)  # q (N, nb, 8, 32)
    qh = np.zeros((*q.shape[:2], 32), dtype=np.uint8)
    for j in range(8):
        qh |= ((q[:, :, j] >> 4) & 1) << j
    low = (q & 15).reshape(*q.shape[:2], 4, 2, 32)
    qs = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(*q.shape[:2], 128)
    parts = [_f16(d[..., None]), _f16(dmin[..., None]), _pack_k_scales(sc, m), qh, qs]
    return np.concatenate(parts, -1).reshape(w.shape[0], -1)


def pack_q6_k(w: np.ndarray) -> np.ndarray:
    """(N, K) float -> (N, K/256*210) Q6_K bytes: 16 groups of 16 with int8 scales."""
    x = w.reshape(w.shape[0], -1, 16, 16).astype(np.float64)  # (N, nb, 16, 16)
    scale = np.maximum(np.abs(x).max(-1), 1e-8) / 31
    d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float64)  # (N, nb)
    sc = np.clip(np.round(scale / d[..., None]), -128, 127)
    q = np.clip(np.round(x / (d[..., None] * sc)[..., None]), -32, 31) + 32
    u = q.astype(np.uint8).reshape(*x.shape[:2], 2, 4, 32)  # (N, nb, half, j, l)
    lo, hi = u & 15, u >> 4  # low nibbles go to ql, the top two bits to qh
    ql = np.concatenate(
        [lo[..., 0, :] | lo[..., 2, :] << 4, lo[..., 1, :] | lo[..., 3, :] << 4], -1
    )
    qh = hi[..., 0, :] | hi[..., 1, :] << 2 | hi[..., 2, :] << 4 | hi[..., 3, :] << 6
    parts = [
        ql.reshape(*x.shape[:2], 128),
        qh.reshape(*x.shape[:2], 64),
        sc.astype(np.int8).view(np.uint8),
        _f16(d[..., None]),
    ]
    return np.concatenate(parts, -1).reshape(w.shape[0], -1)


def llama3_rope_factors(rope: dict, head_dim: int, theta: float) -> np.ndarray:
    """The ``rope_freqs`` tensor the converter writes for llama3 RoPE scaling."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


_PACKERS = {T.Q4_K: pack_q4_k, T.Q5_K: pack_q5_k, T.Q6_K: pack_q6_k}


def encode(w: np.ndarray, qtype: T) -> np.ndarray:
    """A 2-D float tensor in ``qtype``'s stored form (floats, or (N, bytes) blocks)."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in _PACKERS:
        return _PACKERS[qtype](w)
    return quants.quantize(w.astype(np.float32), qtype)


def write_gguf(
    model_dir: Path,
    out: Path,
    qtype: T = T.F32,
    overrides: dict[str, T] | None = None,
    arch: str | None = None,
) -> dict[str, torch.Tensor]:
    """Convert a HF checkpoint written by ``tests.helpers.make_model`` to a GGUF file.

    Args:
        model_dir: the HF directory.
        out: the ``.gguf`` path.
        qtype: type of every 2-D tensor (1-D tensors stay F32, as the converter writes them).
        overrides: per-HF-name-substring types (``{"v_proj": T.Q6_K}``, Q4_K_M style).
        arch: GGUF architecture to write (default: the config's model_type).

    Returns:
        The HF-named weights the file holds, dequantised by the ``gguf`` package.
    """
    config = json.loads((model_dir / "config.json").read_text())
    arch = arch or config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(theta)
    if rope.get("rope_type") == "llama3":
        head_dim = config.get("head_dim") or hidden // heads
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim, theta))
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(
        writer, model_dir, "qwen2" if arch == "qwen2" else "default", config["vocab_size"]
    )
    held: dict[str, torch.Tensor] = {}
    permuted = arch in ("llama", "mistral")
    for name, tensor in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        w = tensor.float().numpy()
        if permuted and "q_proj" in name:
            w = permute(w, heads)
        elif permuted and "k_proj" in name:
            w = permute(w, kv_heads)
        kind = qtype if w.ndim == 2 else T.F32
        for part, t in (overrides or {}).items():
            if part in name and w.ndim == 2:
                kind = t
        data = encode(w, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
        stored = quants.dequantize(data, kind) if kind not in (T.F32, T.F16) else data
        stored = stored.astype(np.float32).reshape(w.shape)
        if permuted and ("q_proj" in name or "k_proj" in name):
            h = heads if "q_proj" in name else kv_heads
            src = permute(np.arange(w.shape[0]), h)
            stored = stored[np.argsort(src)]
        held[name] = torch.from_numpy(np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, pre: str, vocab_size: int) -> None:
    """The converter's BPE ("gpt2") tokenizer metadata, from ``tokenizer.json``.

    ``pre`` names the pre-tokenizer split, as the converter identifies it (``qwen2`` for Qwen2's
    tokenizer, whose class splits digits one by one). A model whose embedding has more rows than
    the tokenizer has tokens gets ``[PAD{i}]`` tokens up to ``vocab_size``, as the converter pads
    them (llama.cpp takes the vocabulary size from the token list).
    """
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab = {**vocab, **added}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    padding = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens + padding)
    types = [3 if t in added else 1 for t in tokens] + [5] * len(padding)  # 5: UNUSED
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[tok_config["eos_token"]])
    if tok_config.get("bos_token"):
        writer.add_bos_token_id(vocab[tok_config["bos_token"]])
    writer.add_add_bos_token(bool(tok_config.get("bos_token")))
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
