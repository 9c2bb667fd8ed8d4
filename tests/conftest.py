"""Shared fixtures: tiny random checkpoints and GPU skipping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import make_model


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the CPU paged-attention kernel before any test runs (a fresh machine takes about a
    minute, once), so that no test's server start-up timeout includes the build."""
    from mgpu.layers import paged_kernel

    paged_kernel.kernel()


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
