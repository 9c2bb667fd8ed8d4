"""Bad models and bad layouts: a precise message, a non-zero exit, no traceback for CLI users."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mgpu.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["generate", "--device", "cpu", "--prompt", "hi", "--max-tokens", "2", *args])
    return code, capsys.readouterr().err


def test_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(capsys, "--model", str(tmp_path / "nope"))
    assert code == 2
    assert f"model directory {tmp_path / 'nope'} does not exist" in err


def test_unsupported_architecture(
    capsys: pytest.CaptureFixture[str], tiny_llama: Path, tmp_path: Path
) -> None:
    model = tmp_path / "gpt2ish"
    model.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "--model", str(model))
    assert code == 2
    assert "architecture 'GPT2LMHeadModel' is not supported" in err
    assert "LlamaForCausalLM" in err


def test_tp_size_not_dividing_heads(capsys: pytest.CaptureFixture[str], tiny_llama: Path) -> None:
    """-tp 5 on 8 heads and 3 layers: neither a valid TP size nor PP 5 fits 5 devices (a size that
    can be fitted, like -tp 3, runs as PP 3: tests/distributed/test_placement.py)."""
    code, err = run_cli(capsys, "--model", str(tiny_llama), "--tensor-parallel-size", "5")
    assert code == 2
    assert "tensor parallel size 5 does not divide" in err
    assert "sizes that work: 1, 2, 4, 8" in err


def _copy_with(tmp: Path, src: Path, mutate) -> Path:
    tmp.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (tmp / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return tmp


def test_missing_tensor(
    capsys: pytest.CaptureFixture[str], tiny_llama: Path, tmp_path: Path
) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    model = _copy_with(tmp_path / "m", tiny_llama, lambda t: t.pop(name))
    code, err = run_cli(capsys, "--model", str(model), "--tensor-parallel-size", "2")
    assert code == 2
    assert f"missing tensor(s) {name}" in err


def test_misshaped_tensor(
    capsys: pytest.CaptureFixture[str], tiny_llama: Path, tmp_path: Path
) -> None:
    name = "model.layers.0.mlp.down_proj.weight"

    def shrink(t: dict) -> None:
        t[name] = t[name][:, :-8].contiguous()

    model = _copy_with(tmp_path / "m", tiny_llama, shrink)
    code, err = run_cli(capsys, "--model", str(model))
    assert code == 2
    assert f"checkpoint tensor {name} has shape (64, 120), expected (64, 128)" in err


def test_unexpected_tensor(
    capsys: pytest.CaptureFixture[str], tiny_llama: Path, tmp_path: Path
) -> None:
    import torch

    model = _copy_with(tmp_path / "m", tiny_llama, lambda t: t.update(extra=torch.zeros(2)))
    code, err = run_cli(capsys, "--model", str(model))
    assert code == 2
    assert "unexpected tensor 'extra'" in err


def test_pickle_checkpoints_refused(
    capsys: pytest.CaptureFixture[str], tiny_llama: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    code, err = run_cli(capsys, "--model", str(model))
    assert code == 2
    assert "pickle checkpoints are refused" in err


def test_cli_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgpu.cli",
            "generate",
            "--model",
            str(tmp_path / "nope"),
            "--prompt",
            "x",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"mgpu: error: model directory {tmp_path / 'nope'} does not exist"


def test_offline_hub_id_not_cached(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = run_cli(capsys, "--model", "nobody/not-a-model")
    assert code == 2
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err


def test_cli_generate_streams(capsys: pytest.CaptureFixture[str], tiny_llama: Path) -> None:
    code = main(
        [
            "generate",
            "--model",
            str(tiny_llama),
            "--device",
            "cpu",
            "--prompt",
            "The quick",
            "--max-tokens",
            "8",
            "--tensor-parallel-size",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("The quick") and len(out) > len("The quick\n")
