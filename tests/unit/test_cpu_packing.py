"""Loading on CPU reorders the dense weights for oneDNN, except where a weight must stay plain.

The products themselves are checked in ``test_dense_linear.py``; every model test against
``transformers`` runs through the reordered weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mgpu.config import ModelConfig
from mgpu.layers import matmul
from mgpu.layers.linear import LinearBase
from mgpu.layers.matmul import keep_plain_weights
from mgpu.models.loader import load_weights
from mgpu.models.registry import model_class
from tests.helpers import make_model

pytestmark = pytest.mark.skipif(not matmul.ONEDNN, reason="this torch build has no oneDNN")


def _load(path: Path) -> nn.Module:
    config = ModelConfig.from_file(path)
    model = model_class(config)(config, (0, config.num_hidden_layers), True, True)
    load_weights(model, path, progress=False)
    return model


def test_linears_and_untied_head_are_reordered(tiny_llama: Path) -> None:
    model = _load(tiny_llama)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.weight.is_mkldnn for m in linears)
    assert model.lm_head.weight.is_mkldnn
    assert not model.embed_tokens.weight.is_mkldnn  # looked up by row
    with keep_plain_weights():
        plain = _load(tiny_llama)
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        dense = a.to_dense() if a.is_mkldnn else a
        assert not b.is_mkldnn and torch.equal(dense, b), name  # same values, same names
    plain_first = next(m for m in plain.modules() if isinstance(m, LinearBase))
    x = torch.randn(3, plain_first.input_size)
    want = torch.nn.functional.linear(x, plain_first.weight)
    torch.testing.assert_close(linears[0].quant_method.apply(linears[0], x), want)


def test_tied_head_keeps_the_embedding_weight(tmp_path: Path) -> None:
    model = _load(make_model(tmp_path / "tied", "llama3", tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not model.lm_head.weight.is_mkldnn
