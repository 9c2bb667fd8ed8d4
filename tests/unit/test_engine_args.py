"""EngineArgs: one field per setting, the CLI generated from it, vLLM's flags handled."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from mgpu.cli import build_parser
from mgpu.config import EngineArgs
from mgpu.errors import ConfigError


def test_every_field_is_one_flag_with_its_help() -> None:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    for f in dataclasses.fields(EngineArgs):
        assert flags[f.name].help == f.metadata["help"]
        assert f"--{f.name.replace('_', '-')}" in flags[f.name].option_strings


def test_cli_round_trip() -> None:
    args = build_parser().parse_args(
        ["serve", "some/model", "-tp", "2", "--layer-split", "3,1", "-pp", "2", "--seed", "3"]
    )
    settings = EngineArgs.from_cli_args(args)
    assert settings.tensor_parallel_size == 2
    assert settings.layer_split == (3, 1)
    assert settings.seed == 3
    assert args.model_tag == "some/model"


def test_ignored_flags_are_named_with_a_reason() -> None:
    assert EngineArgs().ignored() is None
    line = EngineArgs(swap_space=4.0, kv_cache_dtype="fp8").ignored()
    assert line is not None
    assert "--swap-space (" in line and "--kv-cache-dtype (" in line
    assert EngineArgs(enforce_eager=True).ignored() is None  # it turns CUDA graphs off


def test_trust_remote_code_is_refused() -> None:
    with pytest.raises(ConfigError, match="never runs code"):
        EngineArgs(trust_remote_code=True)


def test_generate_serve_and_chat_share_the_engine_flags() -> None:
    parser = build_parser()
    for command in ("generate", "serve", "chat"):
        extra = ["--prompt", "x"] if command == "generate" else []
        args = parser.parse_args([command, "--max-num-seqs", "3", *extra])
        assert EngineArgs.from_cli_args(args).max_num_seqs == 3


def test_no_import_circle_between_the_entry_points() -> None:
    """serve.py and chat.py import neither cli.py nor each other; cli.py imports them."""
    import ast

    import mgpu

    root = Path(mgpu.__file__).parent
    for name, forbidden in {
        "serve": {"mgpu.cli", "mgpu.chat"},
        "chat": {"mgpu.cli", "mgpu.serve"},
        "entry": {"mgpu.cli", "mgpu.serve", "mgpu.chat"},
    }.items():
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & forbidden, (name, imported & forbidden)


def test_python_m_mgpu_serve_parses_on_its_own(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """``python -m mgpu.serve`` builds its own parser (no detour through ``mgpu.cli``), with the
    same one-line user errors."""
    from mgpu.serve import main as serve_main

    assert serve_main(["--dry-run", "--device", "cpu", "-tp", "2"]) == 0
    assert "TP 2 x PP 1" in capsys.readouterr().out
    assert serve_main([str(tmp_path / "none"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_printed_commands_round_trip_through_the_parser() -> None:
    """``to_cli_args`` writes what ``mgpu serve`` parses back to the same settings."""
    settings = EngineArgs(
        model="org/model",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        layer_split=(20, 12),
        enable_expert_parallel=True,
        quantization="int4",
        max_model_len=4096,
        gpu_memory_utilization=0.95,
        enable_prefix_caching=False,
        device_memory="24GiB,12GiB",
    )
    argv = settings.to_cli_args()
    assert argv[:2] == ["--model", "org/model"]
    assert "--no-enable-prefix-caching" in argv and "--layer-split" in argv
    assert EngineArgs.from_cli_args(build_parser().parse_args(["serve", *argv])) == settings
    assert EngineArgs().to_cli_args() == []
    assert EngineArgs().to_cli_args(include=("max_num_seqs",)) == ["--max-num-seqs", "64"]


def test_every_engine_setting_reaches_the_engine() -> None:
    """Each keyword ``engine_kwargs`` passes is a parameter of ``LLMEngine``."""
    import inspect

    from mgpu.engine.llm_engine import LLMEngine

    accepted = set(inspect.signature(LLMEngine.__init__).parameters)
    assert set(EngineArgs().engine_kwargs()) <= accepted
