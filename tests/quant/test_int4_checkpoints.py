"""AWQ (GEMM) and GPTQ checkpoints packed here in each format's published layout from known
integer weights, against ``transformers`` running the dequantised weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mgpu import LLM
from tests.helpers import make_model

GROUP = 128
PROMPT = list(range(3, 40))
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pack_cols(codes: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """(R, 8C) codes -> (R, C) int32; nibble i of word c holds column 8c + order[i]."""
    c = codes.to(torch.int64).view(codes.shape[0], -1, 8)
    words = sum(c[..., order[i]] << (4 * i) for i in range(8))
    return (words - ((words >> 31) << 32)).to(torch.int32).contiguous()  # two's complement


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(8R, C) codes -> (R, C) int32; nibble j of word r holds row 8r + j."""
    c = codes.to(torch.int64).view(-1, 8, codes.shape[1])
    words = sum(c[:, j] << (4 * j) for j in range(8))
    return (words - ((words >> 31) << 32)).to(torch.int32).contiguous()


def _quantize(w: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Asymmetric 4-bit of W (N, K) with input channel k in group g_idx[k]: codes (K, N),
    zeros (G, N), fp16 scales (G, N), and the dequantised (N, K) weight."""
    groups = int(g_idx.max()) + 1
    wt = w.T  # (K, N)
    scales = torch.empty(groups, w.shape[0])
    zeros = torch.empty(groups, w.shape[0])
    for j in range(groups):
        members = wt[g_idx == j]  # (G members, N)
        lo, hi = members.amin(0), members.amax(0)
        scales[j] = ((hi - lo) / 15).clamp(min=1e-6)
        zeros[j] = torch.round(-lo / scales[j]).clamp(0, 15)
    scales = scales.half()
    s, z = scales.float()[g_idx], zeros[g_idx]  # (K, N)
    codes = torch.round(wt / s + z).clamp(0, 15).contiguous()
    return codes, zeros, scales, ((codes - z) * s).T.contiguous()


def write_checkpoint(model_dir: Path, out: Path, method: str, desc_act: bool = False) -> Path:
    """The model of ``model_dir`` as an AWQ/GPTQ checkpoint in ``out``; the HF dir ``out/ref``
    holds the same weights dequantised (the reference)."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    packed, reference = {}, {}
    torch.manual_seed(0)
    for name, t in tensors.items():
        base, _, _ = name.rpartition(".")
        if not (name.endswith(".weight") and base.rsplit(".", 1)[-1] in _LINEARS):
            packed[name] = reference[name] = t
            continue
        k = t.shape[1]
        g_idx = torch.arange(k) // GROUP
        if desc_act:
            g_idx = g_idx[torch.randperm(k)]
        codes, zeros, scales, deq = _quantize(t.float(), g_idx)
        reference[name] = deq
        if method == "awq":
            packed[f"{base}.qweight"] = _pack_cols(codes, _AWQ_ORDER)
            packed[f"{base}.qzeros"] = _pack_cols(zeros, _AWQ_ORDER)
        else:
            packed[f"{base}.qweight"] = _pack_rows(codes)
            packed[f"{base}.qzeros"] = _pack_cols(zeros - 1, tuple(range(8)))  # v1's zero - 1
            packed[f"{base}.g_idx"] = g_idx.to(torch.int32)
        packed[f"{base}.scales"] = scales
    ref = out / "ref"
    ref.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (ref / f.name).write_bytes(f.read_bytes())
            (out / f.name).write_bytes(f.read_bytes())
    save_file(reference, str(ref / "model.safetensors"))
    save_file(packed, str(out / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = (
        {
            "quant_method": "awq",
            "bits": 4,
            "group_size": GROUP,
            "version": "gemm",
            "zero_point": True,
        }
        if method == "awq"
        else {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP,
            "desc_act": desc_act,
            "sym": False,
        }
    )
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(
        tmp_path_factory.mktemp("int4ckpt"),
        "qwen2",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
    )


def _logits(path: Path, tp: int = 1) -> torch.Tensor:
    with LLM(
        str(path), tensor_parallel_size=tp, device="cpu", dtype="float32", num_blocks=64
    ) as llm:
        return llm.prompt_logits(PROMPT)


@pytest.mark.parametrize(
    ("method", "desc_act"), [("awq", False), ("gptq", False), ("gptq", True)], ids=str
)
def test_matches_transformers_on_dequantised_weights(
    tmp_path: Path, model_dir: Path, method: str, desc_act: bool
) -> None:
    """AWQ and GPTQ without act-order load exactly (int4, fp32 dequantising path); GPTQ
    act-order is requantized to per-row int8."""
    path = write_checkpoint(model_dir, tmp_path / "q", method, desc_act)
    hf = AutoModelForCausalLM.from_pretrained(path / "ref", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    got = _logits(path)
    if desc_act:
        assert (got - ref).abs().max() <= 0.15 * ref.abs().max()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85
    else:
        assert (got - ref).abs().max() <= 1e-3
    if method == "awq":  # TP=2 cuts o_proj/down_proj on 128-channel group boundaries
        assert (_logits(path, tp=2) - ref).abs().max() <= 1e-3
