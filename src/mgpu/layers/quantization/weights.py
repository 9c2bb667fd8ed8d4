"""Packed weight forms of one linear shard and their matmuls: dense, int8 and int4.

Every quantized source (``--quantization``, GGUF blocks) ends in one of these forms:

- :class:`DenseWeight`: float ``(N, K)``, ``F.linear``.
- :class:`Int8Weight`: int8 ``(N, K)`` and one scale per output row, ``w = q * s``. Kernel:
  ``torch.ops.aten._weight_int8pack_mm``.
- :class:`Int4Weight`: 4-bit codes ``q`` in [0, 15] with a scale and a zero point per group of
  ``group_size`` columns, ``w = (q - 8) * s + z`` (the convention of PyTorch's int4 kernels).
  Kernels: ``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA.

Each form has two paths: the fused PyTorch kernel, and a dequantise-block-by-block path (rows of
the weight turned back to float a block at a time, then ``F.linear``) used where the kernel does
not exist or does not take the shape; the tests run both and compare them.
The kernels run only for bfloat16 and float16 activations. With fp32 activations PyTorch's CPU
kernels measured 5-30x slower than with bf16, slower than a dense fp32 matmul (see
docs/quantization.md), and rounding fp32 activations to bf16 for them moves an fp32 model's
logits by a few percent; so an fp32 model takes the exact dequantising path.

Storage while loading is simple and sliceable: int4 codes two to a byte, low nibble first. Once
every shard of a layer is in, :meth:`Int4Weight.finalize` repacks into the kernel's tiled layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Output rows turned back to float at a time on the dequantising path.
DEQUANT_BLOCK_ROWS = 1024
#: Group sizes PyTorch's int4 kernels take.
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _blocked_linear(
    x: torch.Tensor, n: int, rows_to_float: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """``x @ W^T`` with W produced ``DEQUANT_BLOCK_ROWS`` rows at a time by ``rows_to_float``."""
    if n <= DEQUANT_BLOCK_ROWS:
        return F.linear(x, rows_to_float(0, n))
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)  # (tokens, N)
    for start in range(0, n, DEQUANT_BLOCK_ROWS):
        end = min(start + DEQUANT_BLOCK_ROWS, n)
        out[..., start:end] = F.linear(x, rows_to_float(start, end))
    return out


@dataclass
class DenseWeight:
    """A float shard (a GGUF F16/F32 tensor inside a quantized file, a float part of a layer)."""

    weight: torch.Tensor  # (N, K)

    @property
    def out_features(self) -> int:
        """N."""
        return self.weight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Storage to register on the layer."""
        return {"weight": self.weight}

    def finalize(self, use_kernel: bool) -> None:
        """Nothing to repack."""

    def dequantize(self) -> torch.Tensor:
        """(N, K) float."""
        return self.weight

    def matmul(self, x: torch.Tensor, use_kernel: bool) -> torch.Tensor:
        """(T, K) -> (T, N)."""
        return F.linear(x, self.weight.to(x.dtype))


@dataclass
class Int8Weight:
    """int8 codes with one scale per output row: ``w[n, k] = q[n, k] * scale[n]``."""

    qweight: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) float32

    @property
    def out_features(self) -> int:
        """N."""
        return self.qweight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Storage to register on the layer."""
        return {"qweight": self.qweight, "scale": self.scale}

    def finalize(self, use_kernel: bool) -> None:
        """Nothing to repack: the int8 kernel takes the plain (N, K) layout."""

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        return self.qweight.float() * self.scale[:, None]

    def matmul(self, x: torch.Tensor, use_kernel: bool) -> torch.Tensor:
        """(T, K) -> (T, N), fused kernel on CPU or block-by-block dequantisation."""
        # The CPU kernel reads K in steps of 16 and crashes (SIGSEGV) on other widths, which a
        # row-parallel or expert shard of a narrow layer can have (48 columns over TP=2).
        k = self.qweight.shape[1]
        if use_kernel and x.device.type == "cpu" and x.dtype != torch.float32 and k % 16 == 0:
            x2 = x.reshape(-1, x.shape[-1])
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale.to(x.dtype))
            return y.view(*x.shape[:-1], -1)

        def rows(start: int, end: int) -> torch.Tensor:
            return self.qweight[start:end].to(x.dtype) * self.scale[start:end, None].to(x.dtype)

        return _blocked_linear(x, self.out_features, rows)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8 of a float (N, K) tensor: ``scale = max |w| / 127``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return Int8Weight(q, scale)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes in [0, 15] -> (N, K/2) uint8, element 2i in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes (inverse of :func:`pack_nibbles`)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


@dataclass
class Int4Weight:
    """4-bit group-wise codes: ``w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]``, g = k // G.

    ``packed`` holds the codes two to a byte (:func:`pack_nibbles`) until :meth:`finalize`, after
    which it may be the kernel's tiled layout (``layout == "cpu"`` or ``"cuda"``).
    """

    packed: torch.Tensor  # (N, K/2) uint8
    scale: torch.Tensor  # (N, K/G) float32
    zero: torch.Tensor  # (N, K/G) float32
    group_size: int
    layout: str = "nibbles"
    scale_zero: torch.Tensor | None = None  # (K/G, N, 2) in the kernel dtype, after finalize

    @property
    def out_features(self) -> int:
        """N."""
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        """K."""
        return self.scale.shape[1] * self.group_size

    def tensors(self) -> dict[str, torch.Tensor]:
        """Storage to register on the layer (the kernel's scale/zero pairs replace the float ones
        once finalized)."""
        if self.scale_zero is not None:
            return {"qweight": self.packed, "scale_zero": self.scale_zero}
        return {"qweight": self.packed, "scale": self.scale, "zero": self.zero}

    def kernel_fits(self, device: torch.device) -> bool:
        """Whether PyTorch's int4 kernel on ``device`` takes this shape and group size."""
        n, k = self.out_features, self.in_features
        if self.group_size not in INT4_KERNEL_GROUPS or k % self.group_size:
            return False
        if device.type == "cpu":
            return n % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        # The CUDA kernel tiles N by 8 and K by inner_k_tiles * 16 = 128.
        return device.type == "cuda" and n % 8 == 0 and k % 128 == 0

    def finalize(self, use_kernel: bool, dtype: torch.dtype = torch.bfloat16) -> None:
        """Repack into the kernel's layout when it fits (once, after every shard is loaded).

        Args:
            use_kernel: False keeps the nibble layout (the dequantising path).
            dtype: activation dtype of the model; fp32 keeps the nibble layout (exact maths).
        """
        device = self.packed.device
        if not use_kernel or dtype == torch.float32 or self.layout != "nibbles":
            return
        if not self.kernel_fits(device):
            return
        codes = unpack_nibbles(self.packed)  # (N, K) uint8
        if device.type == "cpu":
            chunks = [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    codes[s : s + DEQUANT_BLOCK_ROWS].to(torch.int32), 1
                )
                for s in range(0, codes.shape[0], DEQUANT_BLOCK_ROWS)
            ]
            self.packed, self.layout = torch.cat(chunks), "cpu"
        else:
            high_first = (codes[:, 0::2] << 4) | codes[:, 1::2]  # (N, K/2) uint8
            self.packed = torch.ops.aten._convert_weight_to_int4pack(high_first, 8)
            self.layout = "cuda"
        pairs = torch.stack([self.scale, self.zero], dim=-1)  # (N, K/G, 2)
        self.scale_zero = pairs.transpose(0, 1).contiguous().to(dtype)  # (K/G, N, 2)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32 (only in the nibble layout)."""
        return self._rows_to_float(0, self.out_features, torch.float32)

    def _rows_to_float(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_nibbles(self.packed[start:end]).to(dtype) - 8.0  # (rows, K)
        rows, g = end - start, self.group_size
        w = codes.view(rows, -1, g) * self.scale[start:end, :, None].to(dtype)
        return (w + self.zero[start:end, :, None].to(dtype)).view(rows, -1)  # (rows, K)

    def matmul(self, x: torch.Tensor, use_kernel: bool) -> torch.Tensor:
        """(T, K) -> (T, N) through the kernel when finalized into its layout."""
        if self.layout != "nibbles":
            assert self.scale_zero is not None
            x2 = x.reshape(-1, x.shape[-1])
            if self.layout == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x2, self.packed, self.group_size, self.scale_zero
                )
            else:
                y = torch.ops.aten._weight_int4pack_mm(
                    x2, self.packed, self.group_size, self.scale_zero
                )
            return y.view(*x.shape[:-1], -1)
        return _blocked_linear(
            x, self.out_features, lambda s, e: self._rows_to_float(s, e, x.dtype)
        )


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    """Asymmetric group-wise int4 of a float (N, K) tensor (min/max per group of columns).

    Args:
        w: the shard, K a multiple of ``group_size``.
        group_size: columns sharing one scale and zero point.
    """
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)  # (N, K/G, G)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/G)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + 8.0 * scale  # so that (q - 8) * scale + zero = q * scale + lo
    return Int4Weight(pack_nibbles(codes.view(n, k)), scale, zero, group_size)


PackedWeight = DenseWeight | Int8Weight | Int4Weight


def concat_rows(parts: list[PackedWeight]) -> PackedWeight | None:
    """Stack shards of one layer along N into one weight, or None when their forms differ."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if not all(type(p) is type(first) for p in parts):
        return None
    if isinstance(first, DenseWeight):
        return DenseWeight(torch.cat([p.weight for p in parts]))  # type: ignore[union-attr]
    if isinstance(first, Int8Weight):
        return Int8Weight(
            torch.cat([p.qweight for p in parts]),  # type: ignore[union-attr]
            torch.cat([p.scale for p in parts]),
        )
    if any(p.group_size != first.group_size for p in parts):  # type: ignore[union-attr]
        return None
    return Int4Weight(
        torch.cat([p.packed for p in parts]),  # type: ignore[union-attr]
        torch.cat([p.scale for p in parts]),
        torch.cat([p.zero for p in parts]),  # type: ignore[union-attr]
        first.group_size,
    )
