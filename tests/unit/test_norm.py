"""RMSNorm's CPU kernel (``cpu_kernels.rms_norm``) against the PyTorch form it replaces, on the
same inputs: Llama and Gemma weights, with and without the residual add, every float dtype."""

from __future__ import annotations

import pytest
import torch

from mgpu.layers import cpu_kernels, norm
from mgpu.layers.norm import GemmaRMSNorm, RMSNorm

#: Tolerance by dtype: the kernel sums the squares in another order, so a value at a rounding
#: boundary can land one unit of the last place away.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make(cls: type[RMSNorm], dtype: torch.dtype, hidden: int) -> RMSNorm:
    module = cls(hidden, eps=1e-5)
    module.weight.data = (torch.randn(hidden) * 0.5 + 1).to(dtype)
    return module


def pytorch_form(
    module: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, torch.Tensor]:
    with monkeypatch.context() as patch:
        patch.setattr(norm, "_cpu_kernel", lambda *args, **kwargs: None)
        return module(x, residual)


@pytest.mark.parametrize("cls", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 3, 70])
@pytest.mark.parametrize("with_residual", [False, True])
def test_kernel_matches_the_pytorch_form(
    cls: type[RMSNorm],
    dtype: torch.dtype,
    rows: int,
    with_residual: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cpu_kernels.kernel() is not None, "the CPU kernels did not build"
    torch.manual_seed(rows)
    module = make(cls, dtype, 257)  # a width with a vector remainder
    x = (torch.randn(rows, 257) * 3).to(dtype)
    residual = torch.randn(rows, 257).to(dtype) if with_residual else None
    want, want_residual = pytorch_form(module, x, residual, monkeypatch)
    with torch.inference_mode():
        got, got_residual = module(x, residual)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_residual, want_residual, atol=0, rtol=0)


def test_kernel_takes_strided_input_and_leaves_x_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A column slice (not contiguous) is normalised as its copy would be, and x is unchanged."""
    module = make(RMSNorm, torch.float32, 16)
    wide = torch.randn(4, 32)
    x = wide[:, ::2]
    before = wide.clone()
    want, _ = pytorch_form(module, x.contiguous(), None, monkeypatch)
    got, residual = module(x, None)
    torch.testing.assert_close(got, want)
    assert torch.equal(wide, before) and torch.equal(residual, x)


def test_per_head_norms_of_a_strided_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3's q/k norms: (tokens, heads, d), a head slice of the fused projection."""
    module = make(RMSNorm, torch.bfloat16, 8)
    qkv = torch.randn(3, 5, 8).bfloat16()
    x = qkv[:, 1:4]
    want, _ = pytorch_form(module, x, None, monkeypatch)
    got, residual = module(x, None)
    assert got.shape == (3, 3, 8) and residual.shape == (3, 3, 8)
    torch.testing.assert_close(got, want, atol=8e-3, rtol=8e-3)


def test_pytorch_form_where_the_kernel_would_differ() -> None:
    """A float32 weight on bfloat16 activations promotes Llama's output to float32 in the PyTorch
    form; autograd needs the PyTorch form's backward."""
    x = torch.randn(2, 8).bfloat16()
    module = make(RMSNorm, torch.float32, 8)
    assert norm._cpu_kernel(x, None, module.weight, gemma=False) is None
    assert module(x)[0].dtype == torch.float32
    assert norm._cpu_kernel(x, None, module.weight, gemma=True) is not None
    grad_x = torch.randn(2, 8, requires_grad=True)
    assert norm._cpu_kernel(grad_x, None, make(RMSNorm, torch.float32, 8).weight, False) is None
