"""Mixture-of-experts layers and the checkpoint names each family declares, in one process.

The MoE block is compared with transformers' own block on the same weights; the TP and EP splits
are checked by building every rank's shard (the TP position set by hand, no process group needed
until the all-reduce) and summing their partial outputs, which is what the all-reduce does.
Quantized experts (``--quantization int8|int4``) are compared with the float experts, layer by
layer and through the whole engine on a tiny random Mixtral (TP=2 and EP=2).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from mgpu.config import ModelConfig, ParallelConfig
from mgpu.distributed import parallel_state as ps
from mgpu.errors import ConfigError
from mgpu.layers.activation import silu_and_mul
from mgpu.layers.moe import ExpertWeights, FusedMoE, expert_parallel, expert_range
from mgpu.layers.quantization import finish_loading, get_quantization_config, quantization_scope
from mgpu.layers.quantization.weights import Int4Weight, Int8Weight, quantize_int4, quantize_int8
from mgpu.models.registry import model_class
from tests.helpers import ARCHS, assert_argmax_where_clear, engine_run, make_model

HIDDEN, INTER = 32, 48


def _load(param: torch.nn.Parameter, tensor: torch.Tensor, shard: object, name: str) -> None:
    param.checkpoint_name = name  # type: ignore[attr-defined]
    param.weight_loader(param, tensor, shard)  # type: ignore[attr-defined]


def _fill_experts(experts: ExpertWeights, full: dict[str, torch.Tensor]) -> None:
    """Load ``experts`` from per-expert checkpoint tensors ``full`` as the loader would."""
    for param in (experts.w13, experts.w2):
        for name, shard in param.hf_names:  # type: ignore[attr-defined]
            _load(param, full[name], shard, name)


def _routed_tokens(num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """33 random tokens (33, HIDDEN), each with 2 routing weights (33, 2) and 2 distinct experts
    (33, 2)."""
    torch.manual_seed(seed)
    x = torch.randn(33, HIDDEN)
    weights = torch.rand(33, 2)
    experts = torch.stack([torch.randperm(num_experts)[:2] for _ in range(33)])
    return x, weights, experts


def _random_experts(num_experts: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    full = {}
    for e in range(num_experts):
        full[f"{e}.gate_proj.weight"] = torch.randn(INTER, HIDDEN) * 0.2
        full[f"{e}.up_proj.weight"] = torch.randn(INTER, HIDDEN) * 0.2
        full[f"{e}.down_proj.weight"] = torch.randn(HIDDEN, INTER) * 0.2
    return full


@pytest.mark.parametrize(
    ("family", "renormalize"),
    [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)],
    ids=["mixtral", "qwen3_moe-norm_topk", "qwen3_moe-softmax_share"],
)
def test_moe_block_matches_transformers(family: str, renormalize: bool) -> None:
    """Routing (softmax, top-k, each family's renormalisation) and experts vs transformers."""
    extra = {"norm_topk_prob": renormalize} if family == "qwen3_moe" else {}
    hf_config = AutoConfig.for_model(
        family,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        moe_intermediate_size=INTER,
        num_local_experts=6,
        num_experts=6,
        num_experts_per_tok=2,
        **extra,
    )
    block_class = MixtralSparseMoeBlock if family == "mixtral" else Qwen3MoeSparseMoeBlock
    torch.manual_seed(1)
    hf = block_class(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    moe = FusedMoE(HIDDEN, INTER, 6, 2, renormalize, silu_and_mul, names)
    gate_up, down = hf.experts.gate_up_proj.detach(), hf.experts.down_proj.detach()
    full = {}
    for e in range(6):
        full[f"{e}.{names[0]}.weight"] = gate_up[e, :INTER]
        full[f"{e}.{names[1]}.weight"] = gate_up[e, INTER:]
        full[f"{e}.{names[2]}.weight"] = down[e]
    _fill_experts(moe.experts, full)
    _load(moe.gate.weight, hf.gate.weight.detach(), None, "gate.weight")

    x = torch.randn(40, HIDDEN)
    with torch.no_grad():
        expected = hf(x.unsqueeze(0))[0]
        got = moe(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("is_expert_parallel", [False, True], ids=["tp2", "ep2"])
@pytest.mark.parametrize("num_experts", [4, 5])
def test_two_rank_shards_sum_to_the_whole(
    monkeypatch: pytest.MonkeyPatch, is_expert_parallel: bool, num_experts: int
) -> None:
    """Each rank's partial output, summed as the all-reduce sums them, is the unsharded output;
    each rank holds about half the expert bytes (5 experts over 2 ranks: 3 and 2)."""
    full = _random_experts(num_experts)
    names = ("gate_proj", "up_proj", "down_proj")
    whole = ExpertWeights(HIDDEN, INTER, num_experts, names)
    _fill_experts(whole, full)
    x, weights, experts = _routed_tokens(num_experts, seed=2)
    expected = whole(x, weights, experts, silu_and_mul)

    total = torch.zeros_like(x)
    whole_bytes = sum(p.numel() for p in whole.parameters())
    for rank in range(2):
        monkeypatch.setattr(ps, "_STATE", ps._State(tp_size=2, tp_rank=rank))
        with expert_parallel(is_expert_parallel):
            shard = ExpertWeights(HIDDEN, INTER, num_experts, names)
        _fill_experts(shard, full)
        total += shard(x, weights, experts, silu_and_mul)
        share = sum(p.numel() for p in shard.parameters()) / whole_bytes
        local = expert_range(num_experts, 2, rank)
        assert shard.num_local_experts == (
            local[1] - local[0] if is_expert_parallel else num_experts
        )
        assert share == pytest.approx(
            0.5 if num_experts == 4 or not is_expert_parallel else 0.6 - 0.2 * rank
        )
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)


def test_expert_range_covers_every_expert_once() -> None:
    for experts, ranks in [(8, 2), (5, 2), (128, 8), (3, 4)]:
        ranges = [expert_range(experts, ranks, r) for r in range(ranks)]
        assert [e for a, b in ranges for e in range(a, b)] == list(range(experts))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoint_names_are_declared_by_the_model(arch: str, tmp_path: Path) -> None:
    """What a family declares covers exactly what transformers writes: the strict loader's view."""
    path = make_model(tmp_path, arch)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    config = ModelConfig.from_file(path)
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    assert set(model.checkpoint_names()) == written
    assert cls.all_checkpoint_names(config) - written <= {"lm_head.weight"}
    assert written <= cls.all_checkpoint_names(config)


def test_expert_parallel_rank_needs_only_its_experts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = make_model(tmp_path, "mixtral")
    config = ModelConfig.from_file(path)
    monkeypatch.setattr(ps, "_STATE", ps._State(tp_size=2, tp_rank=1))
    with torch.device("meta"), expert_parallel(True):
        model = model_class(config)(config)
    experts = {n.split(".")[5] for n in model.checkpoint_names() if ".experts." in n}
    assert experts == {"2", "3"}
    # The strict loader still knows every expert of the checkpoint.
    known = type(model).all_checkpoint_names(config)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in known


def test_hub_style_configs() -> None:
    """Configs as the hub has them (written before transformers 5) give the same layout."""
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    gemma2 = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "sliding_window": 4096,
            "hidden_activation": "gelu_pytorch_tanh",
        }
    )
    assert [gemma2.layer_window(i) for i in range(3)] == [4096, None, 4096]
    assert gemma2.hidden_act == "gelu_pytorch_tanh"
    gemma3 = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "sliding_window": 512,
            "sliding_window_pattern": 3,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    assert [gemma3.attention_type(i) for i in range(3)] == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1e6, 1e4)
    assert gemma3.rope_scaling is not None and gemma3.rope_scaling.factor == 8.0
    qwen_moe = ModelConfig.from_dict(
        {
            **base,
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [5],
            "norm_topk_prob": False,
        }
    )
    assert qwen_moe.num_local_experts == 8 and qwen_moe.intermediate_size == 32
    assert [i for i in range(6) if qwen_moe.is_moe_layer(i)] == [1, 3]
    assert qwen_moe.dense_intermediate_size == 128 and not qwen_moe.norm_topk_prob


def test_expert_parallel_refuses_a_dense_model(tmp_path: Path) -> None:
    config = ModelConfig.from_file(make_model(tmp_path, "qwen3"))
    with pytest.raises(ConfigError, match="dense model without experts"):
        ParallelConfig(2, 1, None, enable_expert_parallel=True).check_model(config)


def test_expert_width_that_tp_cannot_slice_needs_expert_parallel(tmp_path: Path) -> None:
    config = ModelConfig.from_file(make_model(tmp_path, "mixtral", intermediate_size=100))
    with pytest.raises(ConfigError, match="--enable-expert-parallel places whole experts"):
        ParallelConfig(8, 1).check_model(config)
    ParallelConfig(8, 1, None, enable_expert_parallel=True).check_model(config)


def _quantized_experts(
    quantization: str, num_experts: int, full: dict[str, torch.Tensor], dtype: torch.dtype
) -> ExpertWeights:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with quantization_scope(get_quantization_config(quantization, group_size=32)):
            experts = ExpertWeights(
                HIDDEN, INTER, num_experts, ("gate_proj", "up_proj", "down_proj")
            )
    finally:
        torch.set_default_dtype(previous)
    _fill_experts(experts, full)
    finish_loading(experts)
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_experts_match_the_float_ones(
    monkeypatch: pytest.MonkeyPatch, quantization: str, dtype: torch.dtype
) -> None:
    """Each expert is stored int8/int4 (no float stack left), its output within the
    quantization's error of the float experts'; TP=2 and EP=2 shards of the quantized experts
    sum to the unsharded quantized output (EP: the very same weights; TP: the down projection's
    scales and groups of the down projection are taken over each rank's columns, so within the
    same error of the float experts)."""
    num_experts = 4
    full = _random_experts(num_experts)
    names = ("gate_proj", "up_proj", "down_proj")
    ref = ExpertWeights(HIDDEN, INTER, num_experts, names)
    _fill_experts(ref, full)
    x, weights, experts = _routed_tokens(num_experts, seed=3)
    expected = ref(x, weights, experts, silu_and_mul)

    quant = _quantized_experts(quantization, num_experts, full, dtype)
    kind = Int8Weight if quantization == "int8" else Int4Weight
    assert all(isinstance(w, kind) for w in quant.packed_w13 + quant.packed_w2)
    assert {name for name, _ in quant.named_parameters()}.isdisjoint({"w13", "w2"})
    got = quant(x.to(dtype), weights.to(dtype), experts, silu_and_mul).float()
    bound = {"int8": 0.02, "int4": 0.15}[quantization] + (0.02 if dtype == torch.bfloat16 else 0)
    assert (got - expected).norm() <= bound * expected.norm()
    whole_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert sum(p.numel() * p.element_size() for p in quant.parameters()) < 0.4 * whole_bytes

    for is_expert_parallel in (False, True):
        total = torch.zeros_like(got)
        for rank in range(2):
            monkeypatch.setattr(ps, "_STATE", ps._State(tp_size=2, tp_rank=rank))
            with expert_parallel(is_expert_parallel):
                shard = _quantized_experts(quantization, num_experts, full, dtype)
            total += shard(x.to(dtype), weights.to(dtype), experts, silu_and_mul).float()
        if is_expert_parallel:  # the same quantized experts, only split over the ranks
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (total - got).norm() <= tol * got.norm()
        else:  # each rank quantizes its own columns of down_proj (its own scales and groups)
            assert (total - expected).norm() <= bound * expected.norm()
        monkeypatch.setattr(ps, "_STATE", ps._State())


PROMPTS = [list(range(3, 30)), [7, 8, 9], [42, 17]]
MAX_TOKENS = 12


def _dequantized_checkpoint(src: Path, dst: Path, quantization: str) -> Path:
    """A copy of ``src`` whose projections (attention and every expert) hold the values
    ``--quantization`` stores: quantized here and dequantized, so quantizing them again while
    loading gives the same codes, and the float engine on ``dst`` is the exact reference."""
    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith("_proj.weight") or re.search(r"\.w[123]\.weight$", name):
            q = quantize_int8(w) if quantization == "int8" else quantize_int4(w, 128)
            weights[name] = q.dequantize().contiguous()
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_int4_mixtral_engine_agrees_with_float(tmp_path: Path) -> None:
    """A tiny random Mixtral through the whole engine with ``--quantization int4``, against the
    unquantized engine running the weights the quantized one holds (int8 experts are compared
    layer by layer above). With fp32 activations (the exact dequantising path) at TP=2, every
    expert sliced, it gives the reference's greedy tokens and logits within rounding; with bf16
    kernels at EP=2, whole experts per rank, it stays close and agrees wherever the greedy
    choice is clear of bf16's rounding. Each rank's predicted bytes match what it holds."""
    shape = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2}
    path = make_model(tmp_path / "hf", "mixtral", **shape)
    path = _dequantized_checkpoint(path, tmp_path / "deq", "int4")

    def run(q: str | None, dtype: str, tp: int, ep: bool, follow: list[list[int]] | None):
        """Greedy tokens, the logits along ``follow`` (default: those tokens), the layout."""
        return engine_run(
            path,
            PROMPTS,
            MAX_TOKENS,
            follow,
            dtype=dtype,
            tensor_parallel_size=tp,
            enable_expert_parallel=ep,
            num_blocks=32,
            quantization=q,
        )

    ref_tokens, ref, _ = run(None, "float32", 1, False, None)
    for dtype, ep in (("float32", False), ("bfloat16", True)):
        tokens, got, layout = run("int4", dtype, 2, ep, ref_tokens)
        for row in layout:
            assert row["predicted_param_bytes"] == pytest.approx(row["param_bytes"], rel=0.01)
        if dtype == "float32":
            assert tokens == ref_tokens
            for r, g in zip(ref, got, strict=True):
                torch.testing.assert_close(g, r, atol=1e-3 * r.abs().max().item(), rtol=0)
        else:
            for r, g in zip(ref, got, strict=True):
                assert (g - r).norm() <= 0.1 * r.norm()
            decided = sum(
                assert_argmax_where_clear(r, g, slice(len(p) - 1, -1))  # the continuation
                for p, r, g in zip(PROMPTS, ref, got, strict=True)
            )
            assert decided >= len(PROMPTS) * MAX_TOKENS // 3
