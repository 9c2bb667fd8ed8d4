"""The rotary embedding's CPU kernel (``cpu_kernels.rotary``) against the PyTorch form it
replaces, on the same inputs: a strided view of the fused projection, every token count, float32
within the last place and bfloat16/float16 bit for bit."""

from __future__ import annotations

import pytest
import torch

from mgpu.layers import cpu_kernels, rotary
from mgpu.layers.rotary import RotaryEmbedding, apply_rotary


def pytorch_form(
    x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(rotary, "_cpu_kernel", lambda *args: None)
        return apply_rotary(x, rope)


@pytest.mark.parametrize("tokens", [0, 1, 5, 40, 300])
def test_kernel_matches_the_pytorch_form(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """q and k as the model rotates them: a (tokens, heads, d) view of the fused qkv output."""
    assert cpu_kernels.kernel() is not None, "the CPU kernels did not build"
    torch.manual_seed(tokens)
    d, heads = 64, 6
    rope = RotaryEmbedding(d, 4096, 10000.0, None)(torch.arange(tokens) * 37 + 3, torch.float32)
    qkv = torch.randn(tokens, (heads + 2) * d) * 2
    x = qkv[:, : heads * d].view(tokens, heads, d)
    assert rotary._cpu_kernel(x, *rope) is not None
    want = pytorch_form(x, rope, monkeypatch)
    got = apply_rotary(x, rope)
    assert got.shape == want.shape and got.is_contiguous()
    # The kernel's products may fuse into one FMA: the last place can differ.
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_kernel_rejects_bad_shapes() -> None:
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    cos = torch.ones(2, 1, 8)
    with pytest.raises(RuntimeError, match="d even"):
        kernel.rotary(torch.randn(2, 3, 7), torch.ones(2, 1, 7), torch.ones(2, 1, 7))
    with pytest.raises(RuntimeError, match="cos and sin \\(tokens, 1, d\\)"):
        kernel.rotary(torch.randn(2, 3, 8), torch.ones(3, 1, 8), torch.ones(3, 1, 8))
    with pytest.raises(RuntimeError, match="of one dtype"):
        kernel.rotary(torch.randn(2, 3, 8), cos.half(), cos.half())
    with pytest.raises(RuntimeError, match="of one dtype"):
        kernel.rotary(torch.randn(2, 3, 8).double(), cos.double(), cos.double())


@pytest.mark.parametrize("d", [8, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_round_as_the_pytorch_form(
    dtype: torch.dtype, d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half dimensions below one vector, of whole vectors, and with a remainder (80: 40 lanes):
    the kernel rounds each product and the sum as the PyTorch form's operators do."""
    torch.manual_seed(d)
    tokens, heads = 33, 5
    rope = RotaryEmbedding(d, 4096, 10000.0, None)(torch.arange(tokens) * 53 + 1, dtype)
    qkv = (torch.randn(tokens, (heads + 2) * d) * 3).to(dtype)
    x = qkv[:, : heads * d].view(tokens, heads, d)
    assert rotary._cpu_kernel(x, *rope) is not None
    want = pytorch_form(x, rope, monkeypatch)
    got = apply_rotary(x, rope)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)


def test_pytorch_form_under_autograd() -> None:
    """Autograd's recording needs the PyTorch form's backward."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    rope = RotaryEmbedding(8, 64, 10000.0, None)(torch.arange(2), torch.float32)
    assert rotary._cpu_kernel(x, *rope) is None
    apply_rotary(x, rope).sum().backward()
    assert x.grad is not None
