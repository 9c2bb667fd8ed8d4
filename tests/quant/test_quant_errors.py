"""Bad quantized input fails before any worker starts, with a message naming the tensor, type
or field at fault."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from mgpu import LLM
from mgpu.errors import ConfigError, ModelLoadError, UnsupportedModelError
from tests.helpers import make_model
from tests.quant.gguf_files import write_gguf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("bad"), "llama3", rope_scaling=None)


def test_unsupported_architecture(tmp_path: Path, model_dir: Path) -> None:
    write_gguf(model_dir, tmp_path / "m.gguf", T.F32, arch="phi3")
    with pytest.raises(UnsupportedModelError, match=r"GGUF architecture 'phi3'"):
        LLM(str(tmp_path / "m.gguf"), device="cpu")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, value in [("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 64)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_head_count(2)
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    writer.add_tensor("token_embd.weight", w)
    writer.add_tensor("blk.0.attn_q.weight", quants.quantize(w, T.Q4_1), raw_dtype=T.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_q\.weight has type Q4_1"):
        LLM(str(tmp_path / "m.gguf"), device="cpu")


def test_truncated_file(tmp_path: Path, model_dir: Path) -> None:
    write_gguf(model_dir, tmp_path / "full.gguf", T.Q8_0)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf is not a readable GGUF file.*truncated"):
        LLM(str(tmp_path / "cut.gguf"), device="cpu")


def test_unknown_quant_method(tmp_path: Path, model_dir: Path) -> None:
    import shutil

    target = tmp_path / "q"
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "squeezellm", "bits": 4}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"quantization_config\.quant_method = 'squeezellm'"):
        LLM(str(target), device="cpu")


def test_unknown_quantization_flag(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown quantization 'nf4'"):
        LLM(str(model_dir), device="cpu", quantization="nf4")
