"""The dense product's CPU float16 path against float32 arithmetic on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mgpu.layers import matmul
from mgpu.layers.matmul import FP16_UPCAST_MIN_ROWS, dense_linear


@pytest.mark.parametrize("rows", [1, FP16_UPCAST_MIN_ROWS - 1, FP16_UPCAST_MIN_ROWS, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_matches_float32_arithmetic(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    w = (torch.randn(301, 96) * 0.05).half()
    x = torch.randn(rows, 96).half()
    b = torch.randn(301).half() if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = dense_linear(x, w, b)
    assert got.dtype == torch.float16 and got.shape == (rows, 301)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_blocks_cover_every_output_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 rows over 30 outputs (the last one short), batched 3-D input: equal to one
    float32 product rounded to float16."""
    monkeypatch.setattr(matmul, "_BLOCK_BYTES", 7 * 4 * 16)
    torch.manual_seed(1)
    w = torch.randn(30, 16).half()
    x = torch.randn(2, 5, 16).half()
    b = torch.randn(30).half()
    want = F.linear(x.float(), w.float(), b.float()).half()
    torch.testing.assert_close(dense_linear(x, w, b), want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_dtypes_are_plain_linear(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    w = torch.randn(40, 24).to(dtype)
    x = torch.randn(8, 24).to(dtype)
    assert torch.equal(dense_linear(x, w), F.linear(x, w))
