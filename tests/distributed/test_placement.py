"""Placement: automatic from per-device memory and speed (``device_memory=[...]``,
``device_speed=[...]`` on CPU), and an explicit TP size the heads do not divide."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mgpu import LLM, SamplingParams
from mgpu.cli import main as mgpu_main
from mgpu.config import ModelConfig, ParallelConfig
from mgpu.engine.placement import (
    GIB,
    auto_layout,
    fit_tensor_parallel,
    parse_device_memory,
    parse_device_speed,
    resolve_layout,
)
from mgpu.errors import ConfigError
from mgpu.memory import weight_bytes_per_rank
from tests.helpers import hf_greedy, make_model


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 4.6 MB of float32 weights: more than 4 MiB x 0.9, less than 6 MiB x 0.9."""
    return make_model(
        tmp_path_factory.mktemp("six"),
        "llama3",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
    )


def test_parse_device_memory() -> None:
    assert parse_device_memory("24GiB,12GiB") == (24 * GIB, 12 * GIB)
    assert parse_device_memory(["1GiB", "0.5GiB"]) == (GIB, GIB // 2)
    assert parse_device_memory("512MiB") == (512 * 2**20,)
    with pytest.raises(ConfigError, match="24 parsecs"):
        parse_device_memory("24 parsecs")


def test_unequal_budgets_give_an_uneven_split(six_layers: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(six_layers, dtype=torch.float32).eval()
    prompt = [5, 6, 7, 8]
    expected = hf_greedy(hf, prompt, 8)
    with LLM(
        str(six_layers),
        device="cpu",
        dtype="float32",
        device_memory=["4MiB", "2MiB"],
        num_blocks=16,
    ) as llm:
        rows = llm.layout()
        assert len(rows) == 2
        (a, b), (c, d) = rows[0]["layers"], rows[1]["layers"]
        assert (a, d) == (0, 6) and b == c
        assert b - a > d - c  # the larger budget holds more layers
        assert rows[0]["param_bytes"] > rows[1]["param_bytes"]
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected


def test_too_large_is_refused_before_loading(six_layers: Path) -> None:
    with pytest.raises(ConfigError, match=r"GiB short"):
        LLM(str(six_layers), device="cpu", device_memory=["1MiB", "1MiB"], num_blocks=16)


def _config_32_heads(layers: int = 6) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=1000,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
        num_local_experts=0,
        num_experts_per_tok=0,
        bos_token_id=None,
        eos_token_ids=(0,),
        sliding_window=None,
    )


def test_heads_not_divisible_by_three_devices() -> None:
    """32 heads on 3 equal devices that the model needs all of: a pipeline of 3, not TP=3."""
    config = _config_32_heads()
    whole = weight_bytes_per_rank(config, 32, vector_bytes=4)
    layout = auto_layout(config, 4, (int(whole * 0.5),) * 3)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (1, 3)
    assert sum(layout.layer_split) == 6
    assert auto_layout(config, 4, (whole * 2,) * 3).world_size == 1  # fits one: one rank
    assert auto_layout(config, 4, (int(whole * 0.7),) * 2).tensor_parallel_size == 2


def test_parse_device_speed() -> None:
    assert parse_device_speed("2,1") == (2.0, 1.0)
    assert parse_device_speed([3, 1.5]) == (3.0, 1.5)
    with pytest.raises(ConfigError, match="positive"):
        parse_device_speed("2,0")
    with pytest.raises(ConfigError, match="numbers"):
        parse_device_speed("fast,slow")


def test_split_follows_speed_where_memory_allows() -> None:
    """Equal memory, one device three times as fast: it takes about three quarters of the layers;
    with its memory too small for that, it takes what its memory holds and the rest goes on."""
    config = _config_32_heads(layers=16)
    whole = weight_bytes_per_rank(config, 32, vector_bytes=4)
    roomy = (int(whole * 0.9),) * 2  # the model needs both, each could hold 90 % of it
    assert auto_layout(config, 4, roomy).tensor_parallel_size == 2  # equal devices: TP
    fast_first = auto_layout(config, 4, roomy, (3.0, 1.0)).layer_split
    assert fast_first is not None and fast_first[0] >= 11 and sum(fast_first) == 16
    slow_first = auto_layout(config, 4, roomy, (1.0, 3.0)).layer_split
    assert slow_first is not None and slow_first[1] >= 11
    tight = (int(whole * 0.75), int(whole * 0.6))
    capped = auto_layout(config, 4, tight, (3.0, 1.0)).layer_split
    assert capped is not None and fast_first[0] > capped[0] > capped[1]  # memory caps the fast one
    # Unequal memory, speeds unknown: by memory, the larger device holding more.
    by_memory = auto_layout(config, 4, tight).layer_split
    assert by_memory is not None and by_memory[0] > by_memory[1]
    with pytest.raises(ConfigError, match="--device-speed lists 3"):
        auto_layout(config, 4, roomy, (1.0, 2.0, 3.0))


def test_tp_not_dividing_heads_is_fitted() -> None:
    """-tp 3 on 32 heads keeps 3 devices as PP 3; -tp 6 becomes TP 2 x PP 3; -tp 2 stays."""
    config = _config_32_heads()
    fitted, note = fit_tensor_parallel(config, ParallelConfig(3, 1))
    assert (fitted.tensor_parallel_size, fitted.pipeline_parallel_size) == (1, 3)
    assert note is not None and "-tp 3 does not divide the model's 32 attention heads" in note
    assert "TP 1 x PP 3 on the same 3 devices" in note
    fitted, _ = fit_tensor_parallel(config, ParallelConfig(6, 1))
    assert (fitted.tensor_parallel_size, fitted.pipeline_parallel_size) == (2, 3)
    assert fit_tensor_parallel(config, ParallelConfig(2, 2)) == (ParallelConfig(2, 2), None)
    with pytest.raises(ConfigError, match="--layer-split lists 2 stages"):
        fit_tensor_parallel(config, ParallelConfig(3, 2, (3, 3)))  # TP 2 x PP 3 needs 3 entries


@pytest.fixture(scope="module")
def heads_32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer Llama with 32 query heads and 8 KV heads (head_dim 4)."""
    return make_model(
        tmp_path_factory.mktemp("heads32"),
        "llama3",
        hidden_size=128,
        num_attention_heads=32,
        num_key_value_heads=8,
    )


def test_tp3_runs_as_a_pipeline_of_three(heads_32: Path, capsys: pytest.CaptureFixture) -> None:
    """An explicit -tp 3 on 32 heads: one line says PP 3 runs instead, --dry-run and layout() show
    three stages, and the greedy tokens are transformers'."""
    assert mgpu_main(["serve", str(heads_32), "-tp", "3", "--dry-run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mgpu: placement: -tp 3 does not divide the model's 32 attention heads" in out
    assert "TP 1 x PP 3" in out
    hf = AutoModelForCausalLM.from_pretrained(heads_32, dtype=torch.float32).eval()
    prompt = [5, 6, 7, 8, 9]
    expected = hf_greedy(hf, prompt, 8)
    with LLM(
        str(heads_32), tensor_parallel_size=3, device="cpu", dtype="float32", num_blocks=16
    ) as llm:
        assert "running TP 1 x PP 3" in capsys.readouterr().out
        assert [row["layers"] for row in llm.layout()] == [[0, 1], [1, 2], [2, 3]]
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected


def _write_random_llama(path: Path, layers: int, hidden: int, inter: int, vocab: int) -> Path:
    """A float32 Llama checkpoint written straight from random tensors (no transformers init).

    Every layer shares one set of random matrices: generating them is the slow part at this size,
    and equal layers test the split and the pipeline as well as distinct ones.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from tests.helpers import write_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    AutoConfig.for_model(
        "llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        eos_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    ).save_pretrained(path)
    write_tokenizer(path)
    g = torch.Generator().manual_seed(0)
    attn = [torch.randn(hidden, hidden, generator=g) * hidden**-0.5 for _ in range(4)]
    gate, up = (torch.randn(inter, hidden, generator=g) * hidden**-0.5 for _ in range(2))
    down = torch.randn(hidden, inter, generator=g) * inter**-0.5
    norm = torch.ones(hidden)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.05,
        "model.norm.weight": norm,
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, w in zip(("q_proj", "k_proj", "v_proj", "o_proj"), attn, strict=True):
            tensors[f"{p}self_attn.{name}.weight"] = w
        tensors[f"{p}mlp.gate_proj.weight"] = gate
        tensors[f"{p}mlp.up_proj.weight"] = up
        tensors[f"{p}mlp.down_proj.weight"] = down
        tensors[f"{p}input_layernorm.weight"] = norm
        tensors[f"{p}post_attention_layernorm.weight"] = norm
    # safetensors refuses tensors that share memory: each entry gets its own storage as written.
    save_file(
        {k: v.clone() for k, v in tensors.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


@pytest.mark.slow
def test_issue_scale_budgets(tmp_path: Path) -> None:
    """``device_memory=["1GiB", "0.5GiB"]`` for a 1.04 GB float32 model that needs both: 10 layers
    on the 1 GiB device, 5 on the other, transformers' greedy tokens; two 0.5 GiB devices are
    refused before any weight is read, with the shortfall.

    The issue's ~700 MB would fit the 1 GiB device alone (0.9 GiB after the KV reserve), so the
    model is the smallest that needs both budgets.
    """
    path = _write_random_llama(tmp_path / "m", layers=15, hidden=1024, inter=4096, vocab=4096)
    prompt = [5, 6, 7, 8]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = hf_greedy(hf, prompt, 4)
    del hf
    with pytest.raises(ConfigError, match=r"0\.07 GiB short"):
        LLM(str(path), device="cpu", dtype="float32", device_memory=["0.5GiB", "0.5GiB"])
    with LLM(
        str(path),
        device="cpu",
        dtype="float32",
        device_memory=["1GiB", "0.5GiB"],
        num_blocks=8,
        max_model_len=64,
    ) as llm:
        rows = llm.layout()
        assert [row["layers"] for row in rows] == [[0, 10], [10, 15]]
        assert rows[0]["param_bytes"] == rows[0]["predicted_param_bytes"]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected


def test_resolve_layout_uses_what_the_layout_needs() -> None:
    """A model that fits the first device leaves the other budgets unused (no error)."""
    config = _config_32_heads()
    whole = weight_bytes_per_rank(config, 32, vector_bytes=4)
    placed = resolve_layout(config, 4, "cpu", None, None, None, "auto", [f"{whole * 2}B"] * 2)
    assert placed.parallel_config.world_size == 1
    assert placed.rank_memory_bytes == (whole * 2,)
    assert placed.note is None


def test_cuda_speeds_come_from_the_gpu_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the speed of each GPU is its memory bandwidth from the planner's table: an RTX 4090
    (1008 GB/s) beside an RTX 3060 (360 GB/s) of the same memory takes most of the layers."""
    from types import SimpleNamespace

    config = _config_32_heads(layers=16)
    whole = weight_bytes_per_rank(config, 32, vector_bytes=4)
    gpus = [("NVIDIA GeForce RTX 4090", whole), ("NVIDIA GeForce RTX 3060", whole)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(name=gpus[i][0], total_memory=gpus[i][1]),
    )
    placed = resolve_layout(config, 4, "cuda", None, None, None)
    split = placed.parallel_config.layer_split
    assert split is not None and split[0] > 2 * split[1]
    assert placed.note is not None and "by device speed within memory" in placed.note
    assert placed.rank_memory_bytes is None
    # Given speeds replace the table's.
    even = resolve_layout(config, 4, "cuda", None, None, None, device_speed="1,1")
    assert even.parallel_config.tensor_parallel_size == 2  # equal devices: TP


def test_device_speed_on_the_command_line(six_layers: Path, capsys: pytest.CaptureFixture) -> None:
    """``--device-speed 3,1`` beside equal budgets that the model needs both of: the fast device
    takes 5 of 6 layers (5/3 against 1/1 beats 4/3 against 2/1), and the start-up line says the
    split follows speed."""
    argv = ["serve", str(six_layers), "--device", "cpu", "--device-memory", "4MiB,4MiB"]
    assert mgpu_main([*argv, "--device-speed", "3,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers per stage 5,1 by device speed within memory" in out
    assert "[0, 5)" in out and "[5, 6)" in out


def test_device_speed_with_a_fixed_layout_is_refused(
    six_layers: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--device-speed`` only splits an automatic layout: beside -tp, -pp, --layer-split or
    ``--placement manual`` it would change nothing, so the start is refused in one line (exit
    status 2) naming the flag; on CPU it needs the devices --device-memory lists."""
    argv = ["serve", str(six_layers), "--device", "cpu", "--dry-run", "--device-speed", "3,1"]
    for fixed in (["-tp", "2"], ["-pp", "2"], ["--layer-split", "5,1"]):
        assert mgpu_main([*argv, "--device-memory", "4MiB,4MiB", *fixed]) == 2
        err = capsys.readouterr().err
        assert f"but {fixed[0]} fixes the layout; drop --device-speed" in err
        assert len(err.splitlines()) == 1
    assert mgpu_main(argv) == 2
    assert "give --device-memory too" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--placement manual fixes the layout"):
        resolve_layout(_config_32_heads(), 4, "cpu", None, None, None, "manual", "1GiB", "2,1")
