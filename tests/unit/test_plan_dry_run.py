"""Every ``mgpu serve`` command the planner prints is one the engine accepts (issues 9 and 10).

Each catalogue model x precision x GPU set goes through ``mgpu plan``; the printed ``mgpu serve``
line then runs with ``--dry-run``, which resolves the model, the layout, the quantization and
expert parallelism exactly as a real start would, and prints the per-rank table without reading a
weight. The catalogue's own ``config.json`` stands in for the hub's (no download). GGUF plans name
a file the user would fetch, so for them the line goes through the parser and must ask for
``--quantization gguf``; loading GGUF files is covered by ``tests/quant/test_gguf.py``.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from mgpu.cli import build_parser
from mgpu.cli import main as mgpu_main
from mgpu.models.registry import MODEL_REGISTRY
from mgpu.planner.models import catalogue
from mgpu.planner.plan import plan

_PRECISIONS = (None, "bf16", "int8", "int4", "awq-int4", "gptq-int4", "q4_k_m", "q2_k")
_GPU_SETS = ("1x4090", "2x4090", "RTX 5090,RTX 4090", "8xH100-SXM")
#: What an AWQ or GPTQ repository's config.json adds to the base model's.
_QUANT_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
}


def _serve_tokens(command: str) -> list[str]:
    tokens = shlex.split(command)
    while re.match(r"^[A-Z_]+=", tokens[0]):
        tokens.pop(0)  # CUDA_VISIBLE_DEVICES=...
    assert tokens[:2] == ["mgpu", "serve"], command
    return tokens[1:]


def _stand_in(tmp_path: Path, config: dict, quantization: str | None) -> Path:
    """A model directory holding only the catalogue's config.json (plus a quantization_config)."""
    raw = dict(config)
    if quantization in _QUANT_CONFIGS:
        raw["quantization_config"] = _QUANT_CONFIGS[quantization]
    folder = tmp_path / f"model-{quantization or 'float'}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("entry", catalogue(), ids=lambda e: e.name)
def test_every_printed_mgpu_command_passes_dry_run(
    entry, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    printed = 0
    for precision in _PRECISIONS:
        for gpus in _GPU_SETS:
            result = plan(entry.name, gpus, quantization=precision)
            command = result.commands["mgpu"]
            if command.startswith("#"):
                assert command.startswith("# no mgpu serve command: "), command
                assert len(command) > len("# no mgpu serve command: ") + 10  # it says why
                continue
            tokens = _serve_tokens(command)
            args = build_parser().parse_args(tokens)
            if args.quantization == "gguf":
                model = args.model
                assert model.endswith(".gguf") or ":" in model, command
                continue
            model_at = tokens.index("--model") + 1
            tokens[model_at] = str(_stand_in(tmp_path, entry.config, args.quantization))
            capsys.readouterr()
            assert mgpu_main([*tokens, "--dry-run"]) == 0, command
            table = capsys.readouterr().out
            world = args.tensor_parallel_size * args.pipeline_parallel_size
            rows = [line for line in table.splitlines() if re.match(r"^\s*\d+\s+0\s", line)]
            assert len(rows) == world, (command, table)
            printed += 1
    # The planner prints runnable commands for every model the engine registers.
    assert printed or entry.architecture not in MODEL_REGISTRY
