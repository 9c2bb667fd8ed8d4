"""The LoRA pieces on their own: the batched delta, slots, the scheduler's limit, validation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mgpu.cli import main as mgpu_main
from mgpu.config import EngineArgs, ModelConfig, SchedulerConfig
from mgpu.distributed import parallel_state as ps
from mgpu.engine.block_manager import BlockManager
from mgpu.engine.forward_context import (
    ForwardContext,
    LoRAMapping,
    get_forward_context,
    set_forward_context,
)
from mgpu.engine.llm_engine import LLMEngine
from mgpu.engine.scheduler import Scheduler
from mgpu.engine.sequence import Sequence
from mgpu.errors import ConfigError
from mgpu.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mgpu.lora.adapter import LoRAError, LoRAModule, read_adapter
from mgpu.lora.layers import LoRALayer
from mgpu.lora.manager import shard_pair
from mgpu.lora.slots import SlotTable
from mgpu.models.llama import LlamaForCausalLM
from mgpu.models.loader import demo_model_path
from mgpu.sampling import SamplingParams
from tests.lora.conftest import make_adapter

S, R = 3, 4  # slots, slot rank


def _mapping(token_slots: list[int]) -> LoRAMapping:
    slots = torch.tensor(token_slots)
    table = torch.zeros(S + 1, S * R)
    for s in range(S):
        table[s + 1, s * R : (s + 1) * R] = 1
    return LoRAMapping(slots, table[slots + 1])


@pytest.mark.parametrize("kind", ["qkv", "row"])
def test_mixed_batch_delta_equals_each_tokens_own_adapter(kind: str) -> None:
    """Tokens of three adapters (ranks 2, 4, 3) and the base model in one call: each token gets
    ``scaling * x A^T B^T`` of its own adapter, part by part of a fused layer."""
    torch.manual_seed(0)
    if kind == "qkv":
        base = QKVParallelLinear(16, 4, 4, 2, bias=False)  # parts of 16, 8, 8 rows
    else:
        base = RowParallelLinear(12, 16)
    layer = LoRALayer(base, S, R, torch.float32, torch.device("cpu"))
    adapters = {}
    for slot, (rank, scale) in enumerate([(2, 0.5), (4, 2.0), (3, 1.0)]):
        parts = [
            (torch.randn(rank, base.input_size), torch.randn(rows, rank)) if p != 1 else None
            for p, rows in enumerate(base.output_sizes)
        ]  # part 1 (k) left out: an adapter of q and v only
        layer.set_slot(slot, parts, scale)
        adapters[slot] = (parts, scale)
    token_slots = [0, -1, 2, 1, 1, -1, 0, 2]
    x = torch.randn(len(token_slots), base.input_size)  # (T, in)
    y = torch.randn(len(token_slots), sum(base.output_sizes))  # (T, out)
    with set_forward_context(ForwardContext(None, _mapping(token_slots))):
        got = layer(x, y.clone())
    for t, slot in enumerate(token_slots):
        expected = y[t].clone()
        if slot >= 0:
            parts, scale = adapters[slot]
            offset = 0
            for pair, rows in zip(parts, base.output_sizes, strict=True):
                if pair is not None:
                    a, b = pair
                    expected[offset : offset + rows] += scale * (b @ (a @ x[t]))
                offset += rows
        torch.testing.assert_close(got[t], expected, rtol=1e-5, atol=1e-5)


def test_no_mapping_leaves_the_output_alone() -> None:
    base = RowParallelLinear(8, 8)
    layer = LoRALayer(base, S, R, torch.float32, torch.device("cpu"))
    layer.set_slot(0, [(torch.ones(2, 8), torch.ones(8, 2))], 1.0)
    y = torch.randn(3, 8)
    assert layer(torch.randn(3, 8), y) is y  # outside a forward pass
    with set_forward_context(ForwardContext(None, None)):
        assert layer(torch.randn(3, 8), y) is y


def test_forward_context_nests_and_restores() -> None:
    outer, inner = ForwardContext(), ForwardContext()
    assert get_forward_context() is None
    with set_forward_context(outer):
        with set_forward_context(inner):
            assert get_forward_context() is inner
        assert get_forward_context() is outer
    assert get_forward_context() is None


def test_slot_table_keeps_resident_adapters_and_evicts_least_recent() -> None:
    table = SlotTable(2)
    assert table.assign([0, 3, 3]) == (3, 0)
    assert table.assign([5, 3]) == (3, 5)
    assert table.assign([7, 5]) == (7, 5)  # 3 was used least recently
    assert table.assign([0]) == (7, 5)  # the base model needs no slot
    with pytest.raises(ValueError, match="more than 2 slots"):
        table.assign([1, 2, 3])


def test_scheduler_puts_at_most_max_loras_adapters_in_a_batch() -> None:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32)
    scheduler = Scheduler(config, BlockManager(64, 4), max_loras=2)
    loras = [1, 0, 2, 3, 1, 0, 3]
    for i, lora in enumerate(loras):
        seq = Sequence(i, str(i), 0, [1, 2, 3], SamplingParams(max_tokens=4), 4)
        seq.lora_id = lora
        scheduler.add(seq)
    first = scheduler.schedule()
    # Adapter 3 would be a third one: its sequences are passed over and keep their place.
    assert [s.seq.lora_id for s in first.scheduled] == [1, 0, 2, 1, 0]
    assert [s.lora_id for s in scheduler.waiting] == [3, 3]
    for item in first.scheduled:
        item.seq.num_computed_tokens += item.num_tokens
        item.seq.output_token_ids.append(5)  # sampled: one token to feed next
    scheduler.finish(first.scheduled[2].seq)  # adapter 2's request is done
    second = scheduler.schedule()
    assert {s.seq.lora_id for s in second.scheduled} - {0} == {1, 3}
    assert [s.seq.lora_id for s in second.scheduled] == [1, 0, 1, 0, 3, 3]


def test_prefix_cache_is_per_adapter() -> None:
    blocks = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = list(range(9))
    first = Sequence(0, "a", 0, tokens, SamplingParams(), 4)
    blocks.allocate(first.block_table, 9)
    first.num_computed_tokens = 9
    blocks.cache_full_blocks(first)
    same = Sequence(1, "b", 0, tokens, SamplingParams(), 4)
    assert blocks.allocate_prefix(same) == 8
    adapter = Sequence(2, "c", 0, tokens, SamplingParams(), 4, lora_id=1, cache_salt=b"lora:1")
    assert blocks.allocate_prefix(adapter) == 0


def test_cli_flags_and_llm_keywords(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    spec = json.dumps({"name": "b", "path": str(tmp_path)})
    flags = ["--enable-lora", "--lora-modules", "a=/x", spec, "--max-loras", "2"]
    args = EngineArgs.from_cli_args(parser.parse_args([*flags, "--max-lora-rank", "32"]))
    assert args.enable_lora and args.max_loras == 2 and args.max_lora_rank == 32
    assert args.engine_kwargs()["lora_modules"] == ("a=/x", spec)
    assert [LoRAModule.parse(m) for m in args.lora_modules] == [
        LoRAModule("a", "/x"),
        LoRAModule("b", str(tmp_path)),
    ]
    for bad in ["noequals", "=path", '{"name": "x"}', "{broken"]:
        with pytest.raises(LoRAError, match="--lora-modules"):
            LoRAModule.parse(bad)


# ---- validation before serving ----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_config() -> ModelConfig:
    return ModelConfig.from_file(demo_model_path() / "config.json")


def _read(path: Path, config: ModelConfig, max_rank: int = 16) -> None:
    read_adapter(LoRAModule("x", str(path)), LlamaForCausalLM, config, max_rank, "demo")


def test_rank_above_max_lora_rank_is_refused(
    adapters: dict[str, Path], demo_config: ModelConfig
) -> None:
    with pytest.raises(LoRAError, match="has rank 8, above --max-lora-rank 4; start with"):
        _read(adapters["all"], demo_config, max_rank=4)


def test_missing_or_pickled_adapter_is_refused(tmp_path: Path, demo_config: ModelConfig) -> None:
    with pytest.raises(LoRAError, match="not a directory"):
        _read(tmp_path / "absent", demo_config)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoRAError, match="pickled and never loaded"):
        _read(tmp_path, demo_config)


def test_unknown_target_module_is_refused(tmp_path: Path, demo_config: ModelConfig) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file(
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 256),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(4096, 2),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(LoRAError, match="targets 'lm_head', which this model does not have"):
        _read(tmp_path, demo_config)


def test_adapter_of_another_base_model_is_refused_by_shape(
    tmp_path: Path, tiny_llama: Path, demo_config: ModelConfig
) -> None:
    """An adapter trained on another model (other widths) names the shapes and both models."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path / "other")
    with pytest.raises(LoRAError, match=r"q_proj has lora_A \(2, \d+\).*expected \(2, 256\).*"):
        _read(tmp_path / "other", demo_config)


def test_dora_is_refused(tmp_path: Path, demo_config: ModelConfig) -> None:
    path = make_adapter(tmp_path / "a", 2, 4, ["q_proj"], 0)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoRAError, match="DoRA"):
        _read(path, demo_config)


def test_lora_modules_need_enable_lora_and_the_reverse(adapters: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="needs --enable-lora"):
        LLMEngine(device="cpu", lora_modules=[f"a={adapters['all']}"])
    with pytest.raises(ConfigError, match="without --lora-modules would serve no adapter"):
        LLMEngine(device="cpu", enable_lora=True)


def test_dry_run_checks_the_adapters(
    adapters: dict[str, Path],
    demo_config: ModelConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """``mgpu serve --dry-run`` runs the adapter checks a start runs before its workers: good
    adapters are listed under the model name that reaches them, and each refusal a start would
    give is one line on stderr and exit status 2."""
    serve = ["serve", "--device", "cpu", "--dry-run"]
    lora = [*serve, "--enable-lora", "--max-lora-rank", "8"]
    modules = [f"all={adapters['all']}", f"qv={adapters['qv']}"]
    assert mgpu_main([*lora, "--lora-modules", *modules]) == 0
    out = capsys.readouterr().out
    layers = demo_config.num_hidden_layers
    assert f"LoRA adapter all ({adapters['all']}): rank 8, {7 * layers} modules" in out
    assert f"LoRA adapter qv ({adapters['qv']}): rank 4, {2 * layers} modules" in out
    assert "request it as model 'qv'" in out
    refusals = {
        "has rank 8, above --max-lora-rank 4": [
            *serve,
            *("--enable-lora", "--max-lora-rank", "4", "--lora-modules", modules[0]),
        ],
        "not a directory": [*lora, "--lora-modules", f"gone={tmp_path / 'gone'}"],
        "LoRA adapter name 'base' is also the served model's name": [
            *lora,
            *("--served-model-name", "base", "--lora-modules", f"base={adapters['all']}"),
        ],
        "without --lora-modules would serve no adapter": lora,
        "--lora-modules needs --enable-lora": [*serve, "--lora-modules", modules[0]],
    }
    for message, argv in refusals.items():
        assert mgpu_main(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert "Traceback" not in err


def _as_rank(monkeypatch: pytest.MonkeyPatch, tp_size: int, tp_rank: int) -> None:
    """Make layers built from now on take rank ``tp_rank``'s shard (no communication is used)."""
    monkeypatch.setattr(ps, "_STATE", ps._State(tp_size=tp_size, tp_rank=tp_rank))


def test_sharded_deltas_assemble_the_full_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    """TP 4 with 2 KV heads (each KV head on two ranks): every rank's column-parallel delta is its
    rows of the full delta, and the row-parallel partial deltas sum to the full delta."""
    torch.manual_seed(0)
    tp, hidden, d, heads, kv_heads, rank = 4, 16, 4, 4, 2, 3
    a_parts = [torch.randn(rank, hidden) for _ in range(3)]  # q, k, v: (r, in)
    b_parts = [torch.randn(n, rank) for n in (heads * d, kv_heads * d, kv_heads * d)]  # (out, r)
    a_row, b_row = torch.randn(rank, heads * d), torch.randn(hidden, rank)
    x = torch.randn(5, hidden)  # (T, hidden)
    x_row = torch.randn(5, heads * d)  # (T, heads * d), o_proj's input
    mapping = _mapping([0] * 5)
    full_qkv = [x @ a.T @ b.T * 0.5 for a, b in zip(a_parts, b_parts, strict=True)]
    full_row = x_row @ a_row.T @ b_row.T * 0.5
    row_sum = torch.zeros_like(full_row)
    for r in range(tp):
        _as_rank(monkeypatch, tp, r)
        qkv = QKVParallelLinear(hidden, d, heads, kv_heads, bias=False)
        assert qkv.kv_replicas == 2
        lora = LoRALayer(qkv, S, R, torch.float32, torch.device("cpu"))
        pairs = [
            shard_pair(qkv, p, a, b) for p, (a, b) in enumerate(zip(a_parts, b_parts, strict=True))
        ]
        lora.set_slot(0, list(pairs), 0.5)
        with set_forward_context(ForwardContext(None, mapping)):
            local = lora(x, torch.zeros(5, sum(qkv.local_sizes)))  # (T, local q | k | v)
        offset = 0
        for p, n in enumerate(qkv.local_sizes):
            _, start, rows = qkv.shard_rows(p)
            expected = full_qkv[p][:, start : start + rows]
            torch.testing.assert_close(local[:, offset : offset + n], expected)
            offset += n
        o_proj = RowParallelLinear(heads * d, hidden)
        lora_row = LoRALayer(o_proj, S, R, torch.float32, torch.device("cpu"))
        lora_row.set_slot(0, [shard_pair(o_proj, 0, a_row, b_row)], 0.5)
        cols = slice(o_proj.input_start, o_proj.input_start + o_proj.local_input)
        with set_forward_context(ForwardContext(None, mapping)):
            row_sum += lora_row(x_row[:, cols], torch.zeros(5, hidden))
    torch.testing.assert_close(row_sum, full_row)


@pytest.mark.parametrize("tp", [2, 4])
def test_padded_mlp_deltas_assemble_the_full_delta(
    tp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An intermediate width the TP size does not divide (75) is zero-padded in the base layers;
    the LoRA shards follow the same windows: each rank's gate/up delta is its real rows of the full
    delta and zero on the padding, and the down_proj partial deltas, fed the padded activations,
    sum to the full delta."""
    torch.manual_seed(0)
    hidden, inter, rank = 16, 75, 3
    a_parts = [torch.randn(rank, hidden) for _ in range(2)]  # gate, up: (r, in)
    b_parts = [torch.randn(inter, rank) for _ in range(2)]  # (inter, r)
    a_down, b_down = torch.randn(rank, inter), torch.randn(hidden, rank)
    x = torch.randn(5, hidden)  # (T, hidden)
    act = torch.randn(5, inter)  # (T, inter): down_proj's input before sharding
    mapping = _mapping([1] * 5)
    full_gate_up = [x @ a.T @ b.T for a, b in zip(a_parts, b_parts, strict=True)]
    full_down = act @ a_down.T @ b_down.T
    down_sum = torch.zeros_like(full_down)
    for r in range(tp):
        _as_rank(monkeypatch, tp, r)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], pad=True)
        assert gate_up.is_padded
        lora = LoRALayer(gate_up, S, R, torch.float32, torch.device("cpu"))
        pairs = [
            shard_pair(gate_up, p, a, b)
            for p, (a, b) in enumerate(zip(a_parts, b_parts, strict=True))
        ]
        lora.set_slot(1, pairs, 1.0)
        with set_forward_context(ForwardContext(None, mapping)):
            local = lora(x, torch.zeros(5, sum(gate_up.local_sizes)))  # (T, gate_r | up_r)
        n = gate_up.local_sizes[0]
        start, stop = min(r * n, inter), min((r + 1) * n, inter)
        for p in range(2):
            part = local[:, p * n : (p + 1) * n]  # (T, n)
            torch.testing.assert_close(part[:, : stop - start], full_gate_up[p][:, start:stop])
            assert not part[:, stop - start :].any()  # the padding's rows stay zero
        down = RowParallelLinear(inter, hidden, pad=True)
        lora_down = LoRALayer(down, S, R, torch.float32, torch.device("cpu"))
        lora_down.set_slot(1, [shard_pair(down, 0, a_down, b_down)], 1.0)
        padded = torch.zeros(5, down.local_input)  # (T, local_input), zeros past the width
        cols = slice(min(down.input_start, inter), min(down.input_start + down.local_input, inter))
        padded[:, : cols.stop - cols.start] = act[:, cols]
        with set_forward_context(ForwardContext(None, mapping)):
            down_sum += lora_down(padded, torch.zeros(5, hidden))
    torch.testing.assert_close(down_sum, full_down)
