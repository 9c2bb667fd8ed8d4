"""The dense product's CPU paths (oneDNN on reordered and plain weights, float16 in float32
blocks) against ``F.linear`` in float32 on the same weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mgpu.layers import matmul
from mgpu.layers.matmul import FP16_UPCAST_MIN_ROWS, dense_linear


@pytest.mark.parametrize("rows", [1, FP16_UPCAST_MIN_ROWS - 1, FP16_UPCAST_MIN_ROWS, 33])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32_arithmetic(
    rows: int, bias: bool, dtype: torch.dtype
) -> None:
    """float16 always, bfloat16 where this CPU lacks its kernels (UPCAST_DTYPES): the blocked
    float32 path; otherwise F.linear. Either way float32 arithmetic on the stored values."""
    torch.manual_seed(0)
    w = (torch.randn(301, 96) * 0.05).to(dtype)
    x = torch.randn(rows, 96).to(dtype)
    b = torch.randn(301).to(dtype) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = dense_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, 301)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


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


needs_onednn = pytest.mark.skipif(not matmul.ONEDNN, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype", matmul.PACKED_DTYPES)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 5, 33])
def test_onednn_matches_float32_linear(dtype: torch.dtype, packed: bool, rows: int) -> None:
    """Reordered and plain weights, with a bias and a strided (column-sliced) input."""
    torch.manual_seed(2)
    w = (torch.randn(70, 24) * 0.1).to(dtype)
    b = torch.randn(70).to(dtype)
    x = torch.randn(rows, 48).to(dtype)[:, ::2]
    weight = matmul.cpu_packed_weight(w) if packed else w
    assert weight is not None and weight.is_mkldnn == packed
    got = dense_linear(x, weight, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.dtype == dtype and got.shape == (rows, 70)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    batched = dense_linear(x.reshape(1, rows, 24), weight, b)
    torch.testing.assert_close(batched[0].float(), want, atol=tol, rtol=tol)


@needs_onednn
def test_packing_keeps_values_and_skips_other_dtypes() -> None:
    w = torch.randn(16, 8)
    packed = matmul.cpu_packed_weight(w)
    assert packed is not None and packed.shape == w.shape
    assert torch.equal(packed.to_dense(), w)
    assert matmul.cpu_packed_weight(w.half()) is None
    # bfloat16 is reordered only where oneDNN has its kernels; elsewhere it stays plain
    # (F.linear), and the reorder that would have failed is never tried.
    bf16 = matmul.cpu_packed_weight(w.bfloat16())
    assert (bf16 is not None) == (torch.bfloat16 in matmul.PACKED_DTYPES)
    x = torch.randn(3, 8)
    got = dense_linear(x.bfloat16(), w.bfloat16() if bf16 is None else bf16)
    torch.testing.assert_close(got.float(), F.linear(x, w), atol=0.1, rtol=0.05)


def test_switched_off_everything_is_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MGPU_CPU_ONEDNN=0`` (read at import into ``ONEDNN``): plain weights, ``F.linear``."""
    monkeypatch.setattr(matmul, "ONEDNN", False)
    torch.manual_seed(3)
    for dtype in matmul.PACKED_DTYPES:
        w = torch.randn(40, 24).to(dtype)
        x = torch.randn(8, 24).to(dtype)
        assert matmul.cpu_packed_weight(w) is None
        assert torch.equal(dense_linear(x, w), F.linear(x, w))


def test_environment_switch_is_read() -> None:
    """A worker started with ``MGPU_CPU_ONEDNN=0`` sees oneDNN off (the probe reads it)."""
    code = "from mgpu.layers import matmul; print(matmul.ONEDNN)"
    env = {**os.environ, "MGPU_CPU_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@needs_onednn
def test_small_weights_stay_plain_and_take_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``ONEDNN_MIN_ELEMENTS`` a weight is not reordered and its product is ``F.linear``'s
    (bit for bit); at the threshold it is reordered (the suite runs with the threshold at 0)."""
    monkeypatch.setattr(matmul, "ONEDNN_MIN_ELEMENTS", 40 * 24)
    torch.manual_seed(4)
    small, large = torch.randn(39, 24), torch.randn(40, 24)
    x = torch.randn(5, 24)
    assert matmul.cpu_packed_weight(small) is None
    assert torch.equal(dense_linear(x, small), F.linear(x, small))
    packed = matmul.cpu_packed_weight(large)
    assert packed is not None and packed.is_mkldnn
    torch.testing.assert_close(dense_linear(x, packed), F.linear(x, large))


def test_default_threshold_is_read_from_the_environment() -> None:
    """A process started without the variable gets the documented default of 2**19."""
    code = "from mgpu.layers import matmul; print(matmul.ONEDNN_MIN_ELEMENTS)"
    env = {k: v for k, v in os.environ.items() if k != "MGPU_CPU_ONEDNN_MIN_ELEMENTS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(2**19), out.stderr
