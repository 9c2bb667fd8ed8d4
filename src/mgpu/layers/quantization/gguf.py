"""GGUF (llama.cpp) block formats decoded into mgpu's weight forms.

A GGUF matrix (N rows of K) is stored row by row, each row a run of fixed-size blocks. Every
supported type decodes to ``w = codes * scale[g] + offset[g]`` with one (scale, offset) per group
of G consecutive elements of a row (block layouts from ggml's ``ggml-common.h``)::

    type  elems/bytes  layout                                           G   codes, offset
    Q8_0     32 / 34   d f16, q int8[32]                                32  q in -128..127
    Q4_0     32 / 18   d f16, q u4[32] (low nibbles 0-15, high 16-31)   32  q - 8
    Q4_K    256 / 144  d, dmin f16, 8 x (6-bit scale, 6-bit min),       32  q in 0..15, -dmin*m
                       q u4[256] (per 64-element chunk: low, high)
    Q5_K    256 / 176  as Q4_K plus one high bit per element in qh      32  q in 0..31, -dmin*m
    Q6_K    256 / 210  ql u4[256], qh u2[256], int8 scales[16], d f16   16  q - 32

Conversion (measured and chosen in docs/quantization.md): Q4_0 and Q4_K become an
:class:`Int4Weight` exactly (scale ``d * sc``, zero ``8 * scale - dmin * m``: the int4 kernel's
``(q - 8) * s + z``) with G = 32; Q8_0, Q5_K and Q6_K are dequantised and requantized to
:class:`Int8Weight` (one scale per row), which runs the fused int8 kernel; a per-block int8 form
would need the dequantising path, measured 12x slower at decode.

A shard's column range is decoded from the blocks covering it and cut on G-element boundaries,
so a row-parallel shard of a K-quant need not start on a 256-element super-block, only on a
32-element sub-block (16 for Q6_K's float path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mgpu.layers.quantization.weights import (
    Int4Weight,
    Int8Weight,
    pack_nibbles,
    quantize_int8,
)

T = GGMLQuantizationType
#: Float types, read as they are.
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
#: Block types mgpu decodes.
BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K)
SUPPORTED_TYPES = FLOAT_TYPES + BLOCK_TYPES
#: llama.cpp file types (``general.file_type`` names, the planner's GGUF formats) whose tensors
#: are all of the types above, so a file of that type loads whole.
FILE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k")
#: Block types converted exactly to int4 (the rest go to int8).
INT4_TYPES = (T.Q4_0, T.Q4_K)
#: Bits per weight of each type, including its scales (for reports).
BITS_PER_WEIGHT = {t: GGML_QUANT_SIZES[t][1] * 8 / GGML_QUANT_SIZES[t][0] for t in SUPPORTED_TYPES}


@dataclass
class Blocks:
    """Decoded rows: ``w = codes * scale[:, k // group] + offset[:, k // group]``."""

    codes: torch.Tensor  # (R, K) int16
    scale: torch.Tensor  # (R, K/G) float32
    offset: torch.Tensor | None  # (R, K/G) float32, None for 0
    group: int

    def cut(self, start: int, end: int) -> Blocks:
        """Columns ``[start, end)``; both must fall on group boundaries."""
        g = self.group
        assert start % g == 0 and end % g == 0, (start, end, g)
        offset = None if self.offset is None else self.offset[:, start // g : end // g]
        return Blocks(self.codes[:, start:end], self.scale[:, start // g : end // g], offset, g)

    def to_float(self) -> torch.Tensor:
        """(R, K) float32."""
        r, g = self.codes.shape[0], self.group
        w = self.codes.view(r, -1, g).float() * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(r, -1)


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``at`` of every block, as float32: (R, nb)."""
    return raw[..., at : at + 2].contiguous().view(torch.float16)[..., 0].float()


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes per super-block -> 8 six-bit scales and 8 six-bit mins."""
    s = s.to(torch.int32)  # (R, nb, 12)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=-1)  # (R, nb, 8)
    mins = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc.float(), mins.float()


def decode_blocks(raw: torch.Tensor, qtype: GGMLQuantizationType) -> Blocks:
    """Decode whole blocks of ``qtype`` from raw bytes.

    Args:
        raw: (R, nb * block bytes) uint8, R rows of nb blocks each.
        qtype: one of :data:`BLOCK_TYPES`.
    """
    block, size = GGML_QUANT_SIZES[qtype]
    r = raw.shape[0]
    raw = raw.view(r, -1, size)  # (R, nb, bytes)
    nb = raw.shape[1]
    if qtype == T.Q8_0:
        codes = raw[..., 2:].contiguous().view(torch.int8).to(torch.int16)  # (R, nb, 32)
        return Blocks(codes.view(r, -1), _f16(raw, 0), None, 32)
    if qtype == T.Q4_0:
        qs = raw[..., 2:].to(torch.int16)  # (R, nb, 16)
        codes = torch.cat([qs & 15, qs >> 4], dim=-1) - 8  # (R, nb, 32)
        return Blocks(codes.view(r, -1), _f16(raw, 0), None, 32)
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(raw, 0), _f16(raw, 2)  # (R, nb)
        sc, mins = _k_scales(raw[..., 4:16])
        qs = raw[..., -128:].to(torch.int16).view(r, nb, 4, 32)  # 4 chunks of 64 elements
        codes = torch.stack([qs & 15, qs >> 4], dim=3).view(r, nb, 8, 32)  # sub-block order
        if qtype == T.Q5_K:
            qh = raw[..., 16:48].to(torch.int16)  # (R, nb, 32): bit j is sub-block j's high bit
            bits = torch.stack([(qh >> j) & 1 for j in range(8)], dim=2)  # (R, nb, 8, 32)
            codes = codes + 16 * bits
        scale = (d[..., None] * sc).view(r, -1)  # (R, nb * 8)
        offset = -(dmin[..., None] * mins).view(r, -1)
        return Blocks(codes.view(r, -1), scale, offset, 32)
    if qtype == T.Q6_K:
        ql = raw[..., 0:128].to(torch.int16).view(r, nb, 2, 64)
        qh = raw[..., 128:192].to(torch.int16).view(r, nb, 2, 32)
        sc = raw[..., 192:208].contiguous().view(torch.int8).float()  # (R, nb, 16)
        d = _f16(raw, 208)
        lo, hi = ql[..., :32], ql[..., 32:]
        q1 = (lo & 15) | ((qh & 3) << 4)
        q2 = (hi & 15) | (((qh >> 2) & 3) << 4)
        q3 = (lo >> 4) | (((qh >> 4) & 3) << 4)
        q4 = (hi >> 4) | (((qh >> 6) & 3) << 4)
        codes = torch.stack([q1, q2, q3, q4], dim=3) - 32  # (R, nb, 2, 4, 32)
        scale = (d[..., None] * sc).view(r, -1)  # (R, nb * 16), one per 16 elements
        return Blocks(codes.view(r, nb * block), scale, None, 16)
    raise ValueError(f"not a block type mgpu decodes: {qtype.name}")


def to_packed(blocks: Blocks, qtype: GGMLQuantizationType) -> Int4Weight | Int8Weight:
    """The mgpu form of decoded blocks (see the module docstring for the choice)."""
    if qtype == T.Q4_0:
        zero = torch.zeros_like(blocks.scale)
        return Int4Weight(pack_nibbles(blocks.codes + 8), blocks.scale, zero, blocks.group)
    if qtype == T.Q4_K:
        assert blocks.offset is not None
        zero = 8.0 * blocks.scale + blocks.offset
        return Int4Weight(pack_nibbles(blocks.codes), blocks.scale, zero, blocks.group)
    return quantize_int8(blocks.to_float())
