"""The planner: the questions everyone asks, name matching, errors, inputs, the JSON contract."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mgpu.config import ModelConfig
from mgpu.errors import ConfigError
from mgpu.memory import kv_bytes_per_token, weight_bytes_per_rank
from mgpu.planner.cli import EXIT_DOES_NOT_FIT, EXIT_USAGE, main
from mgpu.planner.engines import ENGINES, STRATEGIES
from mgpu.planner.hardware import find_gpu, gpu_catalogue, make_interconnect, parse_gpus
from mgpu.planner.models import catalogue, find_catalogue_model, load_model, name_key
from mgpu.planner.placement import GIB
from mgpu.planner.plan import plan
from mgpu.planner.power import power_plan
from mgpu.planner.quant import find_quantization_tag, parse_quantization
from mgpu.planner.recommend import cloud_instances, recommend
from mgpu.planner.train import plan_lora

# --- the cases everyone asks about -------------------------------------------------------------


@pytest.mark.parametrize(("quantization", "engine"), [("int4", "mgpu"), ("q4_k_m", "llama.cpp")])
def test_llama_33_70b_q4_fits_two_4090s_at_4k_but_not_one(quantization: str, engine: str) -> None:
    kwargs = {"quantization": quantization, "context": 4096, "engine": engine}
    two = plan("Llama-3.3-70B", "2x RTX 4090", **kwargs)
    one = plan("Llama-3.3-70B", "1x RTX 4090", **kwargs)
    assert two.fits and len([d for d in two.devices if d.used]) == 2
    assert two.strategy in STRATEGIES and two.strategy != "single"
    assert not one.fits
    assert one.minimum_fit is not None and one.minimum_fit.startswith("2x GeForce RTX 4090")


def test_mgpu_counts_a_gguf_file_at_the_bits_it_stores() -> None:
    """mgpu converts Q4_K blocks to int4 groups of 32 and Q6_K to int8 rows (about 5.5 bits for
    a Q4_K_M file against the file's 4.84), so 70B Q4_K_M misses two 24 GB cards with mgpu while
    llama.cpp fits; the plan says so and names the format that fits."""
    mgpu = plan("Llama-3.3-70B", "2x RTX 4090", quantization="q4_k_m", context=4096)
    llama = plan("Llama-3.3-70B", "2x RTX 4090", quantization="q4_k_m", engine="llama.cpp")
    assert not mgpu.fits and llama.fits
    assert mgpu.bits_per_weight > llama.bits_per_weight + 0.5
    assert any("--quantization int4" in reason for reason in mgpu.reasons)


def test_llama_33_70b_q4_fits_one_a100_80gb() -> None:
    result = plan("Llama-3.3-70B", "1x A100 80GB", quantization="q4_k_m", context=4096)
    assert result.fits and result.strategy == "single"
    assert result.devices[0].memory_total_gb == 80


@pytest.mark.parametrize("quantization", ["int4", "q4_0", "q4_k_m", "awq-int4"])
def test_llama_31_405b_at_4_bits_needs_more_than_200_gb(quantization: str) -> None:
    result = plan("Llama-3.1-405B", "8xH100-SXM", quantization=quantization)
    assert result.memory_required_gb > 200
    assert sum(d.weights_gb for d in result.devices) > 190


def test_psu_for_two_4090s_and_two_5090s() -> None:
    assert plan("Llama-3.1-8B", "2x RTX 4090").psu_watts >= 1200
    assert plan("Llama-3.1-8B", "2x RTX 5090").psu_watts >= 1400
    # The formula's anchors: NVIDIA's published system-power figures for one card.
    assert power_plan(parse_gpus("1x RTX 4090")[0]).psu_watts == 850
    assert power_plan(parse_gpus("1x RTX 5090")[0]).psu_watts == 1000


# --- one memory formula ------------------------------------------------------------------------


def test_plan_memory_comes_from_mgpu_memory() -> None:
    result = plan("Llama-3.3-70B", "2x RTX 4090", quantization="q4_k_m", parallelism="pp")
    config = load_model("Llama-3.3-70B").config
    for device in result.devices:
        start, end = device.layers
        expected_kv = kv_bytes_per_token(config, end - start, 1, 2)
        assert device.kv_bytes_per_token == expected_kv
        bits = result.bits_per_weight  # what mgpu stores of the q4_k_m file
        weights = weight_bytes_per_rank(config, bits, 1, (start, end), start == 0, end == 80)
        assert device.weights_gb * GIB == pytest.approx(weights)
        assert device.kv_cache_gb * GIB == pytest.approx(expected_kv * 4096)


def test_tensor_parallel_kv_per_token_is_the_rank_share() -> None:
    result = plan("Llama-3.1-70B", "4x A100 80GB", parallelism="tp")
    config = load_model("Llama-3.1-70B").config
    assert result.tensor_parallel_size == 4
    per_rank = kv_bytes_per_token(config, config.num_hidden_layers, 4, 2)
    assert [d.kv_bytes_per_token for d in result.devices] == [per_rank] * 4


def test_kv_bytes_per_token_for_a_local_hf_directory(tmp_path) -> None:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    result = plan(str(tmp_path), "1x RTX 4090", context=128)
    config = ModelConfig.from_dict(raw)
    assert result.quantization == "f32"
    # The engine keeps an f32 model's cache in f32: 4 bytes per element.
    assert result.devices[0].kv_bytes_per_token == kv_bytes_per_token(config, 4, 1, 4)
    assert result.to_dict()["devices"][0]["kv_bytes_per_token"] == 2 * 4 * 2 * 16 * 4


def test_layer_split_is_uneven_on_unequal_gpus() -> None:
    result = plan(
        "Llama-3.3-70B",
        "4090,3060",
        quantization="q3_k_m",
        engine="llama.cpp",
        parallelism="layer-split",
        context=2048,
    )
    assert result.fits and result.strategy == "layer_split"
    big, small = result.layer_split
    assert big > 1.5 * small
    assert sum(result.layer_split) == 80


def test_llama_cpp_layer_split_adds_memory_not_speed() -> None:
    result = plan("Llama-3.1-8B", "2x RTX 4090", quantization="q4_k_m", engine="llama.cpp")
    assert result.strategy == "single"
    split = next(a for a in result.alternatives if a["strategy"] == "layer_split")
    assert split["decode_tokens_per_s"] < result.decode_tokens_per_s.expected
    assert "CUDA_VISIBLE_DEVICES=0" in result.commands["llama.cpp"]


def test_nvlink_beats_pcie_for_tensor_parallel() -> None:
    pcie = plan("Llama-3.1-70B", "2x RTX 3090", quantization="q4_k_m", parallelism="tp")
    nvlink = plan(
        "Llama-3.1-70B",
        "2x RTX 3090",
        quantization="q4_k_m",
        parallelism="tp",
        interconnect="nvlink",
    )
    assert nvlink.decode_tokens_per_s.expected > pcie.decode_tokens_per_s.expected
    assert nvlink.tp_scaling_efficiency > pcie.tp_scaling_efficiency
    assert 0 < pcie.tp_scaling_efficiency < 1


def test_mixtral_keeps_all_experts_but_reads_two() -> None:
    result = plan("mixtral:8x7b", "1x A100 80GB", quantization="q4_k_m")
    spec = load_model("Mixtral-8x7B")
    assert spec.num_params > 45e9 and 12e9 < spec.num_active_params < 14e9
    assert result.devices[0].weights_gb * GIB > spec.num_params * 4.8 / 8 * 0.99
    assert any("experts" in r for r in result.reasons)


def test_concurrency_raises_throughput_and_kv() -> None:
    one = plan("Qwen2.5-7B", "1x RTX 4090", context=8192)
    many = plan("Qwen2.5-7B", "1x RTX 4090", context=8192, concurrency=4)
    assert many.throughput_tokens_per_s > 2 * one.throughput_tokens_per_s
    assert many.devices[0].kv_cache_gb == pytest.approx(4 * one.devices[0].kv_cache_gb)


def test_speed_range_is_ordered_and_below_the_bandwidth_roofline() -> None:
    result = plan("Llama-3.1-8B", "1x RTX 4090", quantization="q4_k_m", engine="llama.cpp")
    decode = result.decode_tokens_per_s
    assert decode.low < decode.expected < decode.high
    # 4.2 GiB of weights at 1008 GB/s: no engine can exceed ~225 tokens/s.
    assert decode.high < 1008e9 / (result.devices[0].weights_gb * GIB)
    prefill = result.prefill_tokens_per_s
    assert prefill.low < prefill.expected < prefill.high


def test_forced_sizes_and_tensor_pipeline() -> None:
    result = plan("Qwen2.5-72B", "8x A100 80GB", tensor_parallel_size=4, pipeline_parallel_size=2)
    assert result.strategy == "tensor_pipeline_parallel"
    assert (result.tensor_parallel_size, result.pipeline_parallel_size) == (4, 2)
    assert "--tensor-parallel-size 4 --pipeline-parallel-size 2" in result.commands["mgpu"]
    assert "--tensor-parallel-size 4" in result.commands["vllm"]


def test_does_not_fit_says_what_would() -> None:
    result = plan("Llama-3.1-405B", "2x RTX 4090", quantization="q4_k_m")
    assert not result.fits and result.margin_gb < 0
    assert result.minimum_fit and "GeForce RTX 4090" in result.minimum_fit
    assert any("does not fit" in r for r in result.reasons)


def test_lighter_precision_is_suggested() -> None:
    result = plan("Llama-3.3-70B", "2x RTX 4090", quantization="bf16")
    assert not result.fits
    assert any("--quantization" in r for r in result.reasons)


# --- name matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Llama-3.3-70B",
        "meta-llama/Llama-3.3-70B-Instruct",
        "llama3.3:70b-instruct-q4_K_M",
        "llama3.3:70b",
        "LLAMA 3.3 70B instruct",
    ],
)
def test_llama_33_spellings(name: str) -> None:
    assert find_catalogue_model(name).name == "Llama-3.3-70B-Instruct"


def test_ollama_tag_implies_quantization() -> None:
    assert load_model("llama3.3:70b-instruct-q4_K_M").implied_quantization == "q4_k_m"
    result = plan("llama3.3:70b-instruct-q4_K_M", "2x RTX 4090")
    assert result.quantization == "q4_k_m"
    assert plan("llama3.3:70b-instruct-q4_K_M", "1x H200", quantization="q8_0").quantization == (
        "q8_0"
    )


def test_names_do_not_collide() -> None:
    assert name_key("qwen2.5-7b") != name_key("qwen2-57b")
    keys = [name_key(entry.name) for entry in catalogue()]
    assert len(keys) == len(set(keys))
    assert find_catalogue_model("Qwen/Qwen2.5-72B-Instruct-AWQ").name == "Qwen2.5-72B-Instruct"
    assert find_catalogue_model("mixtral-8x7b").name == "Mixtral-8x7B-Instruct-v0.1"
    assert find_catalogue_model("deepseek-r1:70b").name == "DeepSeek-R1-Distill-Llama-70B"
    assert find_catalogue_model("llama-7b").name == "LLaMA-7B"


def test_catalogue_covers_the_issue_and_cites_sources() -> None:
    wanted = [
        "Llama-2-7B",
        "Llama-2-13B",
        "Llama-2-70B",
        "Llama-3-8B",
        "Llama-3-70B",
        "Llama-3.1-8B",
        "Llama-3.1-70B",
        "Llama-3.1-405B",
        "Llama-3.3-70B",
        "Mistral-7B",
        "Mixtral-8x7B",
        "Qwen2.5-7B",
        "Qwen2.5-14B",
        "Qwen2.5-32B",
        "Qwen2.5-72B",
        "Qwen3-8B",
        "Qwen3-32B",
        "QwQ-32B",
        "Gemma-2-9B",
        "Gemma-2-27B",
        "CodeLlama-7B",
        "CodeLlama-34B",
        "DeepSeek-R1-Distill-Llama-70B",
    ]
    for name in wanted:
        entry = find_catalogue_model(name)
        assert entry.source.startswith("https://huggingface.co/") and "config.json" in entry.source
        ModelConfig.from_dict(entry.config)
    params = {e.name: load_model(e.name).num_params / 1e9 for e in catalogue()}
    assert 400 < params["Llama-3.1-405B"] < 410
    assert 70 < params["Llama-3.3-70B-Instruct"] < 71
    assert 6.5 < params["Llama-2-7B"] < 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2x RTX 4090 24GB", ["GeForce RTX 4090"] * 2),
        ("2x4090", ["GeForce RTX 4090"] * 2),
        ("4090,3090", ["GeForce RTX 4090", "GeForce RTX 3090"]),
        ("8xH100-SXM", ["H100 SXM5 80GB"] * 8),
        ("1x A100 PCIe 80GB", ["A100 80GB PCIe"]),
        ("3090 Ti", ["GeForce RTX 3090 Ti"]),
        ("NVIDIA A100-SXM4-80GB", ["A100 80GB SXM4"]),
        ("2x MI300X", ["AMD Instinct MI300X"] * 2),
    ],
)
def test_gpu_spellings(text: str, expected: list[str]) -> None:
    devices, _ = parse_gpus(text)
    assert [d.name for d in devices] == expected


def test_ambiguous_gpu_is_noted() -> None:
    spec, note = find_gpu("A100")
    assert spec.name == "A100 80GB SXM4" and note and "A100 80GB PCIe" in note
    result = plan("Llama-3.1-8B", "1x A100")
    assert any("read as A100 80GB SXM4" in r for r in result.reasons)


def test_gpu_catalogue_is_the_shared_spec_file_with_sources() -> None:
    specs = gpu_catalogue()
    assert len(specs) == 20 and all(s.source for s in specs)
    assert find_gpu("RTX 4090")[0].bandwidth_gbs == 1008
    assert find_gpu("RTX 5090")[0].tdp_w == 575


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_model_lists_close_names() -> None:
    with pytest.raises(ConfigError, match=r"Llama-3\.3-70B-Instruct"):
        load_model("Llama-3.4-70B")
    with pytest.raises(ConfigError, match=r"Qwen2\.5"):
        load_model("Qwen2.6-72B")


def test_unknown_gpu_lists_close_names() -> None:
    with pytest.raises(ConfigError, match="GeForce RTX 4080 16GB"):
        parse_gpus("RTX 4080 Super")
    with pytest.raises(ConfigError, match="RTX 4060 Ti"):
        parse_gpus("2x 4060")
    with pytest.raises(ConfigError, match="L40S"):
        parse_gpus("L40")


def test_unknown_precision_engine_interconnect() -> None:
    with pytest.raises(ConfigError, match="q4_k_m"):
        parse_quantization("q4km")
    with pytest.raises(ConfigError, match="unknown --engine"):
        plan("Llama-3.1-8B", "1x RTX 4090", engine="ollama")
    with pytest.raises(ConfigError, match="no NVLink"):
        make_interconnect("nvlink", parse_gpus("2x RTX 4090")[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor_parallel_size": 3}, "sizes that work: 1, 2, 4, 8"),
        ({"tensor_parallel_size": 4}, "needs 4 GPUs"),
        ({"engine": "llama.cpp", "quantization": "awq-int4"}, "cannot run awq-int4"),
        ({"engine": "gpt-fast", "parallelism": "pp"}, "gpt-fast has no pp mode"),
        ({"engine": "exllamav2", "quantization": "q4_k_m"}, "engines that can: mgpu, vllm"),
        ({"context": 0}, "must be positive"),
    ],
)
def test_impossible_requests_say_why(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan("Llama-3.3-70B", "2x RTX 4090", **kwargs)


def test_no_gpus_and_no_nvml_says_what_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mgpu.planner.plan.detect_gpus", lambda: [])
    with pytest.raises(ConfigError, match="--gpus"):
        plan("Llama-3.1-8B")


# --- model inputs ------------------------------------------------------------------------------


def test_gguf_file_gives_its_own_bits_per_weight(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(512)
    writer.add_vocab_size(256)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (256, 64), "output.weight": (256, 64)}
    for layer in range(2):
        shapes[f"blk.{layer}.attn_q.weight"] = (64, 64)
        shapes[f"blk.{layer}.ffn_up.weight"] = (128, 64)
    for name, shape in shapes.items():
        data = gguf.quants.quantize(
            rng.standard_normal(shape).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
        )
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    spec = load_model(str(path))
    assert spec.is_gguf_file and spec.implied_quantization == "q8_0"
    assert spec.file_bits_per_weight == pytest.approx(8.5)
    assert spec.config.num_key_value_heads == 2 and not spec.config.tie_word_embeddings
    result = plan(str(path), "1x RTX 3090", engine="llama.cpp")
    assert result.quantization == "q8_0" and result.bits_per_weight == pytest.approx(8.5)
    assert str(path) in result.commands["llama.cpp"]


@pytest.mark.parametrize(
    ("quantization_config", "expected"),
    [
        ({"quant_method": "awq", "bits": 4}, "awq-int4"),
        ({"quant_method": "gptq", "bits": 4}, "gptq-int4"),
        ({"quant_method": "fp8"}, "fp8"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "nf4"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"group_0": {"weights": {"type": "float", "num_bits": 8}}},
            },
            "fp8",
        ),
    ],
)
def test_hf_directory_quantization_config_is_read(
    tmp_path, quantization_config: dict, expected: str
) -> None:
    raw = dict(find_catalogue_model("Qwen2.5-7B").config)
    raw["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(raw))
    result = plan(str(tmp_path), "1x RTX 4090", engine="vllm")
    assert result.quantization == expected
    vllm_name = parse_quantization(expected).vllm_name
    if vllm_name:
        assert f"--quantization {vllm_name}" in result.commands["vllm"]
    command = result.commands["mgpu"]
    # Printed only once the engine loads the format, and then for this directory.
    assert str(tmp_path) in command or command.startswith("# no mgpu serve command: ")


def test_missing_paths_and_broken_configs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "name", "bits"),
    [
        ("Q4_K_M", "q4_k_m", 4.84),
        ("q8_0", "q8_0", 8.5),
        ("q6_k", "q6_k", 6.5625),
        ("q5_k_m", "q5_k_m", 5.68),
        ("q4_0", "q4_0", 4.5),
        ("fp16", "f16", 16),
        ("bf16", "bf16", 16),
        ("f32", "f32", 32),
        ("fp8", "fp8", 8),
        ("int8", "int8", 8),
        ("int4", "int4", 4.25),
        ("gptq-int4", "gptq-int4", 4.156),
        ("awq", "awq-int4", 4.156),
        ("exl2-4.65bpw", "exl2-4.65", 4.65),
    ],
)
def test_precisions(text: str, name: str, bits: float) -> None:
    fmt = parse_quantization(text)
    assert (fmt.name, fmt.bits_per_weight) == (name, bits)


def test_quantization_tags_in_names() -> None:
    assert find_quantization_tag("turboderp/Llama2-70B-exl2-2.5bpw")[0] == "exl2-2.5"
    assert find_quantization_tag("Qwen2.5-7B-Instruct-GPTQ-Int4")[0] == "gptq-int4"
    assert find_quantization_tag("Llama-3.3-70B")[0] is None


# --- the JSON contract -------------------------------------------------------------------------


def test_json_contract() -> None:
    data = plan("Llama-3.1-8B", "2x RTX 4090").to_dict()
    json.dumps(data)
    assert isinstance(data["fits"], bool)
    assert data["strategy"] in ("single", *STRATEGIES)
    for device in data["devices"]:
        for key in (
            "name",
            "memory_total_gb",
            "weights_gb",
            "kv_cache_gb",
            "activations_gb",
            "overhead_gb",
        ):
            assert key in device
        assert isinstance(device["kv_bytes_per_token"], int)
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
        assert set(data[key]) == {"low", "expected", "high"}
        assert data[key]["low"] <= data[key]["expected"] <= data[key]["high"]
    assert isinstance(data["throughput_tokens_per_s"], float)
    assert isinstance(data["psu_watts"], int)
    assert set(data["commands"]) == {"mgpu", "vllm", "llama.cpp"}
    assert data["commands"]["mgpu"].startswith("mgpu serve ")
    assert data["commands"]["vllm"].startswith("vllm serve ")
    assert "llama-server" in data["commands"]["llama.cpp"]
    assert data["reasons"] and all(isinstance(r, str) for r in data["reasons"])


def test_every_engine_plans(capsys: pytest.CaptureFixture[str]) -> None:
    formats = {
        "exllamav2": "exl2-4.0",
        "exllama": "gptq-int4",
        "llama.cpp": "q4_k_m",
        "ik_llama.cpp": "q4_k_m",
    }
    speeds = {}
    for engine in ENGINES:
        result = plan(
            "Llama-3.1-8B", "2x RTX 3090", engine=engine, quantization=formats.get(engine, "int4")
        )
        assert result.fits and result.decode_tokens_per_s.expected
        speeds[engine] = result.decode_tokens_per_s.expected
    assert len(set(speeds.values())) > 3  # engines differ


# --- CLI, plot, recommend, train ---------------------------------------------------------------


def test_cli_json_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--model", "llama3.3:70b-instruct-q4_K_M", "--gpus", "2x5090", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    assert main(["--model", "Llama-3.3-70B", "--gpus", "4090", "--json"]) == EXIT_DOES_NOT_FIT
    capsys.readouterr()
    assert main(["--model", "Llama-9-70B", "--gpus", "4090"]) == EXIT_USAGE
    assert "unknown model" in capsys.readouterr().err


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "Qwen3-32B", "--gpus", "2x RTX 3090", "--quantization", "q4_k_m"]) == 0
    out = capsys.readouterr().out
    for text in ("FITS", "Memory per GPU", "decode, one stream", "Power supply", "mgpu serve"):
        assert text in out


def test_plot_writes_a_png(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "memory.png"
    main(
        [
            "--model",
            "Llama-3.3-70B",
            "--gpus",
            "4090,3090",
            "--quantization",
            "q4_k_m",
            "--plot",
            str(path),
            "--json",
        ]
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recommend_ranks_options_with_prices_and_tradeoffs() -> None:
    rec = recommend("Llama-3.3-70B", quantization="int4", budget_usd=5000)
    data = rec.to_dict()
    bought = [o for o in data["options"] if o["kind"] == "buy"]
    rented = [o for o in data["options"] if o["kind"] == "rent"]
    assert bought and rented and all(o["fits"] for o in data["options"])
    assert all(o["price_usd"] is None or o["price_usd"] <= 5000 for o in bought)
    names = [o["name"] for o in bought]
    assert "2x GeForce RTX 4090" in names and "1x A100 80GB PCIe" in names
    speeds = [o["decode_tokens_per_s"]["expected"] for o in bought]
    assert speeds[:-1] == sorted(speeds[:-1], reverse=True)
    assert [o["usd_per_hour"] for o in rented] == sorted(o["usd_per_hour"] for o in rented)
    assert all(o["tradeoff"] for o in data["options"])
    assert any(o["price_note"] == "no citable price" for o in bought)
    assert all("http" in o["price_note"] for o in rented)


def test_cloud_prices_cite_sources() -> None:
    instances = cloud_instances()
    assert len(instances) >= 10
    assert all(i.source.startswith("https://") and i.usd_per_hour > 0 for i in instances)


def test_train_lora_memory_time_and_scaling() -> None:
    result = plan_lora("Llama-3.1-8B", "2x RTX 4090", dataset_tokens=10_000_000)
    assert result.fits and result.strategy == "ddp"
    low, expected, high = result.epoch_hours
    assert low < expected < high
    speedups = {p.gpus: p.speedup for p in result.scaling}
    assert speedups[1] == 1.0 and 1.8 < speedups[2] <= 2.0 and speedups[8] > speedups[4]
    qlora = plan_lora(
        "Llama-3.3-70B", "1x A100 80GB", dataset_tokens=10_000_000, quantization="nf4"
    )
    assert qlora.method == "QLoRA" and qlora.fits
    big = plan_lora("Llama-3.3-70B", "2x RTX 4090", dataset_tokens=10_000_000)
    assert not big.fits and big.strategy == "fsdp"
    json.dumps(big.to_dict())


def test_cli_train_and_recommend(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "--model",
                "Llama-3.1-8B",
                "--gpus",
                "2x4090",
                "--train",
                "lora",
                "--dataset-tokens",
                "1000000",
            ]
        )
        == 0
    )
    assert "Time per epoch" in capsys.readouterr().out
    assert main(["--model", "Llama-3.1-8B", "--train", "lora", "--gpus", "4090"]) == EXIT_USAGE
    assert "--dataset-tokens" in capsys.readouterr().err
    assert main(["--model", "Qwen2.5-32B", "--recommend", "--quantization", "q4_k_m"]) == 0
    assert "Trade-offs" in capsys.readouterr().out


def test_uneven_gpus_get_an_uneven_split_in_every_command() -> None:
    result = plan("Qwen2.5-14B", "RTX 5090,RTX 4090", parallelism="pp")
    first, second = result.layer_split
    assert first > second  # the 32 GB card takes more layers
    split = f"{first},{second}"
    assert f"--layer-split {split}" in result.commands["mgpu"]
    assert f"VLLM_PP_LAYER_PARTITION={split}" in result.commands["vllm"]
    assert f"--split-mode layer --tensor-split {split}" in result.commands["llama.cpp"]


def test_detect_gpus_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeNvml:
        NVMLError = RuntimeError

        @staticmethod
        def nvmlInit() -> None:
            pass

        @staticmethod
        def nvmlShutdown() -> None:
            pass

        @staticmethod
        def nvmlDeviceGetCount() -> int:
            return 2

        @staticmethod
        def nvmlDeviceGetHandleByIndex(index: int) -> int:
            return index

        @staticmethod
        def nvmlDeviceGetName(handle: int) -> bytes:
            return [b"NVIDIA GeForce RTX 4090", b"NVIDIA Mystery GPU"][handle]

        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle: int) -> object:
            return type("Info", (), {"total": 24 * GIB - 2**28})()

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml)
    result = plan("Llama-3.1-8B", quantization="q4_k_m")
    assert [d.name for d in result.devices] == ["GeForce RTX 4090", "NVIDIA Mystery GPU"]
    assert result.devices[0].memory_total_gb == pytest.approx(23.75)
    assert any("NVML" in r for r in result.reasons)
