"""Attention over a paged KV cache, in plain PyTorch (the same code on CPU and CUDA).

The cache of one layer on one rank is one tensor of shape (num_blocks, block_size, 2, kv_heads, d):
keys and values of a token side by side, so a step writes them with one ``index_copy_`` and a decode
reads them with one ``index_select``. A sequence owns a list of blocks (its block table); the token
at position p lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Each step's tokens are flattened across sequences: (tokens, heads, head_dim). Sequences feeding one
token (decode) are batched into one pair of matmuls over their gathered caches; sequences feeding
several (prefill, or a chunk of one) are handled one by one with a causal mask offset by what is
already cached.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillSpan:
    """One sequence feeding several tokens this step."""

    token_start: int  # index of its first token in the flat batch
    num_tokens: int
    start_pos: int  # position of its first token (> 0 when part of it is cached already)
    block_table: torch.Tensor  # (num_blocks_of_seq,) int64


@dataclass
class AttentionMetadata:
    """Per-step attention inputs shared by every layer (STYLE.md convention 7)."""

    slot_mapping: torch.Tensor  # (tokens,) int64: cache slot of each new token
    decode_token_idx: torch.Tensor | None = (
        None  # (B,) flat index of each decoding sequence's token
    )
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) int64, padded with block 0
    decode_mask: torch.Tensor | None = None  # (B, 1, 1, max_blocks * block_size) bool: key visible
    all_decode: bool = False  # every token of the step is a decode token (skip the index ops)
    prefills: list[PrefillSpan] = field(default_factory=list)


def visible_keys(
    query_pos: torch.Tensor, num_keys: int, sliding_window: int | None
) -> torch.Tensor:
    """(queries, keys) bool mask: key j is visible to a query at position p if j <= p (and within
    the sliding window)."""
    keys = torch.arange(num_keys, device=query_pos.device)
    mask = keys.unsqueeze(0) <= query_pos.unsqueeze(1)
    if sliding_window is not None:
        mask &= keys.unsqueeze(0) > query_pos.unsqueeze(1) - sliding_window
    return mask


def window_metadata(
    meta: AttentionMetadata, positions: torch.Tensor, sliding_window: int | None
) -> AttentionMetadata:
    """The step's metadata with its decode mask rebuilt for layers of one window width.

    The model runner builds one decode mask for the model's ``sliding_window``; a model whose layers
    differ (Gemma: sliding and global layers) builds one per kind with this, once per step.

    Args:
        meta: the step's metadata.
        positions: (tokens,) absolute positions of the step's tokens.
        sliding_window: the layers' window width, None for global attention.
    """
    if meta.decode_mask is None or meta.decode_token_idx is None:
        return meta
    query_pos = positions[meta.decode_token_idx]  # (B,)
    mask = visible_keys(query_pos, meta.decode_mask.shape[-1], sliding_window)
    return dataclasses.replace(meta, decode_mask=mask[:, None, None, :])  # (B, 1, 1, keys)


class PagedAttention(nn.Module):
    """Scaled dot-product attention of this rank's heads against the paged cache.

    Args:
        num_heads, num_kv_heads, head_dim: this rank's query and KV heads and their width.
        sliding_window: a key is visible only to the next ``sliding_window`` positions.
        scale: score scale (default ``head_dim ** -0.5``).
        softcap: scores become ``softcap * tanh(score / softcap)`` before the mask (Gemma 2);
            SDPA cannot do that, so these layers compute the softmax themselves.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.softcap = softcap
        self.sliding_window = sliding_window
        self.kv_cache = torch.empty(0, 1, 2, num_kv_heads, head_dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (tokens, heads, d), kv (tokens, 2, kv_heads, d) -> (tokens, heads * d)."""
        self.kv_cache.view(-1, 2, self.num_kv_heads, self.head_dim).index_copy_(
            0, meta.slot_mapping, kv
        )
        if meta.all_decode:
            return self._decode(q, meta).reshape(q.shape[0], -1)
        out = torch.empty_like(q)
        if meta.decode_token_idx is not None:
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], meta)
        for span in meta.prefills:
            sl = slice(span.token_start, span.token_start + span.num_tokens)
            out[sl] = self._prefill(q[sl], kv[sl], span)
        return out.reshape(q.shape[0], -1)

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """SDPA of q (B, heads, n, d) over k, v (B, kv_heads, keys, d); grouped heads share a KV
        head. On CPU it runs in float32: its half-precision kernels are 3-9x slower than the
        upcast plus the float32 kernel (measured: 7.8 ms against 0.9 ms for a 32-sequence fp16
        decode layer)."""
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        if self.softcap is not None:
            return self._softcapped(q, k, v, mask).to(dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.to(dtype)

    def _softcapped(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention with soft-capped scores; same shapes and mask convention as ``_sdpa``."""
        assert self.softcap is not None
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # query head i reads KV head i // group, as SDPA's enable_gqa does
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, heads, n, keys)
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:  # causal, queries and keys the same positions
            n = q.shape[-2]
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)  # (B, heads, n, d)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (B, heads, d) -> (B, heads, d), one new token per sequence, against its cache."""
        tables = meta.decode_block_tables  # (B, max_blocks)
        batch = tables.shape[0]
        kv = self.kv_cache.index_select(0, tables.reshape(-1))  # (B * max_blocks, bs, 2, kv, d)
        kv = kv.view(batch, -1, 2, self.num_kv_heads, self.head_dim)  # (B, L, 2, kv, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, kv, L, d) views
        return self._sdpa(q.unsqueeze(2), k, v, meta.decode_mask).squeeze(2)

    def _prefill(self, q: torch.Tensor, kv: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
        """One sequence: q (n, heads, d) and its chunk's kv (n, 2, kv_heads, d) -> (n, heads, d)."""
        n = span.num_tokens
        window = self.sliding_window
        mask = None
        if span.start_pos > 0 or (window is not None and n > window):
            # Part of the sequence is cached already (or the window cuts in): attend to the cache.
            ctx = span.start_pos + n
            cached = self.kv_cache.index_select(0, span.block_table)
            kv = cached.view(-1, 2, self.num_kv_heads, self.head_dim)[:ctx]
            positions = torch.arange(span.start_pos, ctx, device=q.device)
            mask = visible_keys(positions, ctx, window)
        out = self._sdpa(
            q.transpose(0, 1).unsqueeze(0),  # (1, heads, n, d)
            kv[:, 0].transpose(0, 1).unsqueeze(0),  # (1, kv_heads, keys, d)
            kv[:, 1].transpose(0, 1).unsqueeze(0),
            mask,
        )
        return out.squeeze(0).transpose(0, 1)
