"""Shared fixtures: tiny random checkpoints and GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models' weights are all below the size from which CPU products take oneDNN
# (mgpu.layers.matmul.ONEDNN_MIN_ELEMENTS); with the threshold at 0, every model test, and the
# workers it starts (which inherit the environment), runs through the reordered weights that
# real models use. Set before mgpu is imported, which reads it once.
os.environ.setdefault("MGPU_CPU_ONEDNN_MIN_ELEMENTS", "0")

import pytest
import torch

from tests.helpers import make_model


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the CPU kernels before any test runs (a fresh machine takes about a
    minute, once), so that no test's server start-up timeout includes the build."""
    from mgpu.layers import cpu_kernels

    cpu_kernels.kernel()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-3-style random checkpoint (GQA, llama3 RoPE scaling, untied)."""
    return make_model(tmp_path_factory.mktemp("llama3"), "llama3", num_key_value_heads=2)
