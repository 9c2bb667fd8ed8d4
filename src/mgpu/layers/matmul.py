"""The float matrix product of every dense layer: ``F.linear``, except for float16 on CPU.

PyTorch's CPU float16 GEMM has no native kernel on CPUs without AVX512-FP16 or AMX-FP16 (oneDNN
refuses the type there) and falls back to a generic loop: with several rows it runs 2-3x slower
than float32 on the same weights. Its matrix-vector path is fast (half the bytes of float32), so
one row stays as it is, and from :data:`FP16_UPCAST_MIN_ROWS` rows up the weight is turned into
float32 a block of rows at a time (a block fits in cache, so the copy costs little) and multiplied
with float32 accumulation. Measured on a 2-core EPYC (AVX-512 with BF16, no FP16), one thread,
float16 weights, blocks of 1 MB (4 MB measured the same, 16 MB slower)::

    (out, in) x rows     F.linear fp16   blocked fp32   fp32 weights
    4096 x 1024 x 8          2.79 ms        1.56 ms        1.48 ms
    4096 x 1024 x 32        11.19 ms        3.48 ms        3.58 ms
    32000 x 1024 x 32       86.79 ms       28.38 ms       34.40 ms
    4096 x 1024 x 1          0.32 ms        0.81 ms        0.48 ms   (one row: kept as fp16)

bfloat16 needs none of this: oneDNN's AVX512-BF16 kernels multiply 32 rows about 4x faster
than float32 on that CPU. On CUDA every dtype takes ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Rows from which CPU float16 products take the blocked float32 path (at 4 rows it already won
#: in all three shapes measured above; at 2 it lost on the narrow one).
FP16_UPCAST_MIN_ROWS = 4
#: Bytes of one float32 weight block: small enough to stay in cache while it is multiplied.
_BLOCK_BYTES = 2 * 2**20


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in) -> (..., out) in x's dtype.

    Float16 on CPU with at least :data:`FP16_UPCAST_MIN_ROWS` rows multiplies in float32, one
    cache-sized block of weight rows at a time (see the module docstring).
    """
    if (
        weight.dtype != torch.float16
        or weight.device.type != "cpu"
        or x.numel() < FP16_UPCAST_MIN_ROWS * x.shape[-1]
    ):
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    rows = max(1, _BLOCK_BYTES // (4 * in_features))
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, rows):
        end = min(start + rows, out_features)
        block_bias = None if bias is None else bias[start:end].float()
        out[..., start:end] = F.linear(x32, weight[start:end].float(), block_bias)
    return out
