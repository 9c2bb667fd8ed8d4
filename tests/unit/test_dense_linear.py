"""The dense product's CPU paths (the skinny kernel, oneDNN on reordered and plain weights,
float16 in float32 blocks) against ``F.linear`` in float32 on the same weights."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mgpu.layers import cpu_kernels, matmul
from mgpu.layers.matmul import FP16_UPCAST_MIN_ROWS, dense_linear

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
#: Tolerance against float32 arithmetic, by output dtype (its rounding).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def skinny() -> object:
    kernel = cpu_kernels.kernel()
    assert kernel is not None, "the CPU kernels did not build"
    return kernel


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 7, 8, 9, 17, 33])
@pytest.mark.parametrize("weight_dtype", FLOATS)
def test_skinny_kernel_matches_float32_linear(skinny: object, rows: int, weight_dtype) -> None:
    """Every chunk of rows (1-8 and the chunks of 8 after), 301 outputs (tiles and a remainder)
    and 83 inputs (a vector remainder), with and without a bias."""
    torch.manual_seed(5)
    w = (torch.randn(301, 83) * 0.05).to(weight_dtype)
    b = torch.randn(301).to(weight_dtype)
    for x_dtype in FLOATS:
        x = torch.randn(rows, 83).to(x_dtype)
        for bias in (None, b):
            want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            got = skinny.skinny_linear(x, w, bias)
            assert got.dtype == x_dtype and got.shape == (rows, 301)
            tol = TOLERANCE[x_dtype]
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_skinny_kernel_rejects_bad_shapes(skinny: object) -> None:
    with pytest.raises(RuntimeError, match="x \\(M, K\\) and weight \\(N, K\\)"):
        skinny.skinny_linear(torch.randn(2, 5), torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="contiguous weight"):
        skinny.skinny_linear(torch.randn(2, 5), torch.randn(5, 4).t())
    with pytest.raises(RuntimeError, match="bias \\(N,\\)"):
        skinny.skinny_linear(torch.randn(2, 5), torch.randn(4, 5), torch.randn(3))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        skinny.skinny_linear(torch.randn(2, 5), torch.ones(4, 5, dtype=torch.int32))


@pytest.mark.parametrize("dtype", FLOATS)
def test_decode_rows_take_the_skinny_kernel(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain weight with up to skinny_max_rows rows of x (3-D, strided) goes through the
    kernel; one row more does not; ``SKINNY`` off (``MGPU_CPU_SKINNY=0``) never."""
    calls: list[int] = []
    real = matmul._skinny_linear

    def counting(x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor | None:
        out = real(x, *args)
        if out is not None:
            calls.append(x.numel() // x.shape[-1])
        return out

    monkeypatch.setattr(matmul, "_skinny_linear", counting)
    torch.manual_seed(6)
    w = (torch.randn(40, 24) * 0.1).to(dtype)
    limit = matmul.skinny_max_rows(dtype)
    for rows in (1, limit, limit + 1):
        x = torch.randn(1, rows, 48).to(dtype)[..., ::2]
        got = dense_linear(x, w)
        want, tol = F.linear(x.float(), w.float()), TOLERANCE[dtype]
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert calls == [1, limit]
    monkeypatch.setattr(matmul, "SKINNY", False)
    dense_linear(torch.randn(1, 24).to(dtype), w)
    assert calls == [1, limit]


def test_skinny_kernel_keeps_out_of_autograd() -> None:
    """A product autograd records (LoRA training) takes F.linear, which has a backward."""
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(1, 4)
    dense_linear(x, w).sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("rows", [1, FP16_UPCAST_MIN_ROWS - 1, FP16_UPCAST_MIN_ROWS, 33])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32_arithmetic(
    rows: int, bias: bool, dtype: torch.dtype
) -> None:
    """float16 where this CPU lacks native float16 kernels, bfloat16 where it lacks bfloat16 ones
    (UPCAST_DTYPES): the blocked float32 path; otherwise F.linear. Either way float32 arithmetic
    on the stored values."""
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
    monkeypatch.setattr(matmul, "SKINNY", False)
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
    """Below ``ONEDNN_MIN_ELEMENTS`` a weight is not reordered and, the skinny kernel off, its
    product is ``F.linear``'s (bit for bit); at the threshold it is reordered (the suite runs
    with the threshold at 0)."""
    monkeypatch.setattr(matmul, "ONEDNN_MIN_ELEMENTS", 40 * 24)
    monkeypatch.setattr(matmul, "SKINNY", False)
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


def test_native_bfloat16_follows_the_cpu(skinny: object) -> None:
    """The vdpbf16ps path is compiled exactly where the CPU has AVX512-BF16 (``-march=native``),
    and only then do plain bfloat16 weights take the kernel beyond 4 rows."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        pytest.skip("reads x86 CPU flags from /proc/cpuinfo")
    native = " avx512_bf16" in flags
    assert skinny.skinny_native_bf16() == native
    assert matmul.skinny_native_bfloat16() == native
    amx = " amx_tile" in flags and torch.bfloat16 in matmul.PACKED_DTYPES
    assert amx == matmul.AMX_BF16_GEMM
    if torch.bfloat16 in matmul.UPCAST_DTYPES:
        assert matmul.skinny_max_rows(torch.bfloat16) == 32
    else:  # with AMX, oneDNN's bfloat16 F.linear wins from 6 rows
        want = matmul.NATIVE_BF16_MAX_ROWS if native and not amx else 4
        assert matmul.skinny_max_rows(torch.bfloat16) == want


def test_native_float16_follows_the_cpu() -> None:
    """Where the CPU has AVX512-FP16 or AMX-FP16, float16 takes F.linear's native kernels beyond
    12 rows instead of the blocked float32 path; elsewhere it is upcast, the kernel up to 32."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        pytest.skip("reads x86 CPU flags from /proc/cpuinfo")
    fp16 = " avx512_fp16" in flags or " amx_fp16" in flags
    native = torch.backends.mkldnn.is_available() and fp16
    assert native == matmul.NATIVE_FP16_GEMM
    assert (torch.float16 in matmul.UPCAST_DTYPES) == (not native)
    assert matmul.skinny_max_rows(torch.float16) == (
        matmul.NATIVE_FP16_SKINNY_MAX_ROWS if native else 32
    )


@pytest.mark.parametrize("k", [7, 32, 64, 300])
def test_bfloat16_by_bfloat16_every_remainder(skinny: object, k: int) -> None:
    """bfloat16 x and weight (the native path where there is one): inputs shorter than one vector,
    exact vectors, and a long remainder, at every chunk of rows."""
    torch.manual_seed(7)
    w = (torch.randn(37, k) * 0.05).bfloat16()
    for rows in (1, 3, 4, 5, 9, 32):
        x = torch.randn(rows, k).bfloat16()
        want = F.linear(x.float(), w.float())
        got = skinny.skinny_linear(x, w)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
