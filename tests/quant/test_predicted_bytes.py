"""The planner's predicted bytes per rank (``--dry-run``, ``GET /v1/layout``, the startup table)
against the bytes each rank really holds once loaded, for int8, int4 and GGUF Q4_0/Q8_0/Q4_K_M
files at TP=1 and TP=2 (and PP=2).

Every rank is built and loaded here in one process (its TP/PP position set by hand, as the
worker sets it; loading needs no collective), so the check costs no worker processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T

from mgpu.config import ModelConfig
from mgpu.distributed import parallel_state as ps
from mgpu.engine.headless import ResolvedPlan, planned_ranks, resolve_engine
from mgpu.layers.moe import expert_parallel
from mgpu.layers.quantization import quant_config_for, quantization_scope
from mgpu.memory import LinearStorage, stored_bits_per_weight
from mgpu.models.gguf import gguf_model_config
from mgpu.models.loader import load_weights
from mgpu.models.registry import model_class
from mgpu.planner.plan import plan
from tests.helpers import make_model
from tests.quant.gguf_files import write_gguf

SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "rope_scaling": None,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predicted")
    hf = make_model(root / "hf", "llama3", **SHAPE)
    moe = make_model(root / "moe", "mixtral", **{**SHAPE, "intermediate_size": 256})
    out = {"hf": hf, "moe": moe}
    for name, qtype, overrides in (
        ("q4_0", T.Q4_0, None),
        ("q8_0", T.Q8_0, None),
        ("q4_k_m", T.Q4_K, {"v_proj": T.Q6_K, "down_proj": T.Q6_K}),
    ):
        out[name] = root / f"{name}.gguf"
        write_gguf(hf, out[name], qtype, overrides)
    return out


def _predicted(
    path: Path,
    *,
    quantization: str | None,
    dtype: str = "bfloat16",
    tp: int = 2,
    pp: int = 1,
    is_expert_parallel: bool = False,
) -> tuple[ResolvedPlan, list[int]]:
    """The plan a start makes for ``path`` at this layout, and the bytes it predicts per rank."""
    plan = resolve_engine(
        str(path),
        device="cpu",
        dtype=dtype,
        quantization=quantization,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        layer_split=None,
        placement="auto",
        device_memory=None,
        enable_expert_parallel=is_expert_parallel,
    )
    predicted = [int(row["predicted_param_bytes"]) for row in planned_ranks(plan)]  # type: ignore[call-overload]
    return plan, predicted


def _measured(
    monkeypatch: pytest.MonkeyPatch, path: Path, quantization: str | None, plan: ResolvedPlan
) -> list[int]:
    """Bytes of parameters each rank of ``plan`` holds after loading (as ``ModelRunner``)."""
    config = gguf_model_config(path) if path.is_file() else ModelConfig.from_file(path)
    pc = plan.parallel_config
    tp, pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
    cls, out = model_class(config), []
    for rank in range(pc.world_size):
        pp_rank = rank // tp
        state = ps._State(tp_size=tp, tp_rank=rank % tp, pp_size=pp, pp_rank=pp_rank)
        monkeypatch.setattr(ps, "_STATE", state)
        layers = pc.layer_range(config, pp_rank)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(plan.dtype)
        try:
            with (
                expert_parallel(pc.enable_expert_parallel),
                quantization_scope(quant_config_for(path, quantization)),
            ):
                model = cls(config, layers, pp_rank == 0, pp_rank == pp - 1)
        finally:
            torch.set_default_dtype(previous)
        load_weights(model, path)
        out.append(sum(p.numel() * p.element_size() for p in model.parameters()))
    return out


CASES = [
    ("hf", "int8", "bfloat16", 1, 1),
    ("hf", "int8", "bfloat16", 2, 1),
    ("hf", "int4", "bfloat16", 1, 1),
    ("hf", "int4", "bfloat16", 2, 1),
    ("hf", "int4", "float32", 2, 1),
    ("hf", "int4", "bfloat16", 1, 2),
    ("hf", None, "bfloat16", 2, 1),
    ("q4_0", None, "auto", 1, 1),
    ("q4_0", None, "auto", 2, 1),
    ("q8_0", None, "auto", 1, 1),
    ("q8_0", None, "auto", 2, 1),
    ("q4_k_m", None, "auto", 2, 1),
]


@pytest.mark.parametrize(
    ("model", "quantization", "dtype", "tp", "pp"),
    CASES,
    ids=[f"{m}-{q or 'none'}-{d}-tp{t}-pp{p}" for m, q, d, t, p in CASES],
)
def test_predicted_bytes_match_the_loaded_ranks(
    monkeypatch: pytest.MonkeyPatch,
    models: dict[str, Path],
    model: str,
    quantization: str | None,
    dtype: str,
    tp: int,
    pp: int,
) -> None:
    """Within 1%: the prediction counts codes, scales and the float embedding as loaded."""
    plan, predicted = _predicted(
        models[model], quantization=quantization, dtype=dtype, tp=tp, pp=pp
    )
    measured = _measured(monkeypatch, models[model], quantization, plan)
    for p, m in zip(predicted, measured, strict=True):
        assert p == pytest.approx(m, rel=0.01), (predicted, measured)


@pytest.mark.parametrize("is_expert_parallel", [False, True], ids=["tp2", "ep2"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_moe_predicted_bytes(
    monkeypatch: pytest.MonkeyPatch,
    models: dict[str, Path],
    quantization: str | None,
    is_expert_parallel: bool,
) -> None:
    """Mixtral at TP=2 and EP=2: experts counted at their storage, the router in bf16."""
    plan, predicted = _predicted(
        models["moe"], quantization=quantization, is_expert_parallel=is_expert_parallel
    )
    measured = _measured(monkeypatch, models["moe"], quantization, plan)
    for p, m in zip(predicted, measured, strict=True):
        assert p == pytest.approx(m, rel=0.01), (predicted, measured)


def test_bits_per_weight_of_each_storage() -> None:
    """The rates the planner quotes: int4 at 4.25 bits (bf16 kernel scales), 4.5 without the
    kernel, GGUF Q4 blocks converted to groups of 32 at 5.0, int8 at 8 plus its row scale."""
    assert LinearStorage("int4", 2, 128).bits_per_weight() == pytest.approx(4.25)
    assert LinearStorage("int4", 4, 128).bits_per_weight() == pytest.approx(4.5)
    assert LinearStorage("int4", 2, 32).bits_per_weight() == pytest.approx(5.0)
    assert LinearStorage("int8", 2).bits_per_weight(4096) == pytest.approx(8 + 32 / 4096)
    assert LinearStorage("float", 2).bits_per_weight() == 16


def test_stored_rates_of_planner_formats() -> None:
    """What mgpu holds each planner format at: AWQ/GPTQ repacked to the int4 kernel's bf16
    pairs, GGUF Q4 blocks as int4 groups of 32, Q8_0/Q6_K as int8, a Q4_K_M mix in between."""
    assert stored_bits_per_weight("awq-int4", 4.156) == pytest.approx(4.25)
    assert stored_bits_per_weight("int8", 8.0, 8192) == pytest.approx(8 + 32 / 8192)
    assert stored_bits_per_weight("q4_0", 4.5) == pytest.approx(5.0)
    assert stored_bits_per_weight("q8_0", 8.5) == pytest.approx(8 + 32 / 4096)
    assert 5.0 < stored_bits_per_weight("q4_k_m", 4.84) < 6.0
    assert stored_bits_per_weight("nf4", 4.127) == 4.127


def test_mgpu_plans_count_int4_as_mgpu_stores_it() -> None:
    """``mgpu plan`` for mgpu counts an AWQ checkpoint at mgpu's 4.25 bits (repacked with bf16
    pairs), for vLLM at the checkpoint's own 4.156."""
    mine = plan("Llama-3.1-8B", "1x RTX 4090", quantization="awq-int4")
    theirs = plan("Llama-3.1-8B", "1x RTX 4090", quantization="awq-int4", engine="vllm")
    assert mine.bits_per_weight == pytest.approx(4.25)
    assert theirs.bits_per_weight == pytest.approx(4.156)
    assert mine.devices[0].weights_gb > theirs.devices[0].weights_gb


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3"])
def test_float_predictions_are_exact_for_each_family(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arch: str
) -> None:
    """Unquantized, the prediction is the loaded bytes to the byte at TP=2, the families' extra
    norms included (Gemma's sandwich norms, Qwen3's and Gemma 3's q/k norms)."""
    shape = {k: v for k, v in SHAPE.items() if k != "num_hidden_layers"}  # the family's own count
    path = make_model(tmp_path / arch, arch, **shape)
    plan, predicted = _predicted(path, quantization=None, dtype="float32")
    assert predicted == _measured(monkeypatch, path, None, plan)
