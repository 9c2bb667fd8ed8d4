"""Attention over a paged KV cache, in PyTorch on CPU and CUDA (decode on CPU: a compiled kernel).

The cache of one layer on one rank is one tensor of shape (2, kv_heads, num_blocks, block_size, d):
keys then values, each head's blocks side by side. A sequence owns a list of blocks (its block
table); the token at position p lives in slot ``block_table[p // block_size] * block_size +
p % block_size`` of every head. Seen as rows of ``block_size * d`` elements, one block of one head
is one row, so a step reads the blocks of a whole batch with one ``index_select`` over rows, and
the result is already laid out (kv_heads, sequences, keys, d): the matmuls consume it as it is,
with no further copy, and only the blocks the sequences own are read (padded to the longest table).

Each step's tokens are flattened across sequences: (tokens, heads, head_dim). Sequences feeding one
token (decode) are batched into one pair of matmuls over their blocks, grouped query heads sharing
their KV head's keys; on CPU a compiled kernel (:mod:`mgpu.layers.cpu_kernels`) instead follows
the block tables itself and reads each key and value once, where they lie, with no copy.
Sequences feeding several (prefill, or a chunk of one) are batched into
scaled-dot-product calls, each over spans of similar length padded to the longest, each span with
a causal mask offset by what it has cached already.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mgpu.layers import cpu_kernels


@dataclass
class PrefillBatch:
    """Sequences feeding several tokens this step (prefill, or a chunk of one), S of them,
    padded to the longest (max_n) for one attention call."""

    token_idx: torch.Tensor  # (S, max_n) flat index of each token; padding repeats the first
    rows: torch.Tensor  # (P,) real tokens' rows of the (S * max_n) padding
    token_flat: torch.Tensor  # (P,) the same tokens' flat indices
    num_keys: int  # keys per span: the longest context (from the cache) or max_n
    from_cache: bool = False  # a span has cached context: keys come from the cache
    block_tables: torch.Tensor | None = None  # (S, max_ctx_blocks) int64, padded with 0
    mask: torch.Tensor | None = None  # (S, 1, max_n, keys) bool; None: plain causal


@dataclass
class AttentionMetadata:
    """Per-step attention inputs shared by every layer (STYLE.md convention 7).

    The masks depend on the layers' window width: :func:`window_metadata` builds them, for the
    model's ``sliding_window`` in the model runner and for layers of another width in the model.
    """

    slot_mapping: torch.Tensor  # (tokens,) int64: cache slot of each new token
    # Decoding sequences (one new token each), B of them.
    decode_token_idx: torch.Tensor | None = None  # (B,) flat index of each decoding token
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) int64, padded with block 0
    decode_num_keys: int = 0  # max_blocks * block_size
    decode_bias: torch.Tensor | None = None  # (B, 1, keys) float32: 0 (visible) or -inf
    decode_context_lens: torch.Tensor | None = None  # (B,) int64: keys up to and incl. the new
    all_decode: bool = False  # every token of the step is a decode token (skip the index ops)
    prefills: list[PrefillBatch] = field(default_factory=list)  # prefilling sequences, batched


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
    """The step's metadata with its masks built for layers of one window width.

    The model runner builds them for the model's ``sliding_window``; a model whose layers differ
    (Gemma: sliding and global layers) builds one set per kind with this, once per step.

    Args:
        meta: the step's metadata.
        positions: (tokens,) absolute positions of the step's tokens.
        sliding_window: the layers' window width, None for global attention.
    """
    decode_bias = None
    if meta.decode_token_idx is not None:
        query_pos = positions[meta.decode_token_idx]  # (B,)
        visible = visible_keys(query_pos, meta.decode_num_keys, sliding_window)  # (B, keys)
        zeros = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
        decode_bias = zeros.masked_fill(~visible, float("-inf")).unsqueeze(1)  # (B, 1, keys)
    prefills = [
        dataclasses.replace(b, mask=_prefill_mask(b, positions, sliding_window))
        for b in meta.prefills
    ]
    return dataclasses.replace(meta, decode_bias=decode_bias, prefills=prefills)


def _prefill_mask(
    batch: PrefillBatch, positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor | None:
    """(S, 1, max_n, keys) mask of one prefill batch; None when SDPA's causal mode is it."""
    spans, max_n = batch.token_idx.shape
    # Fresh spans need no mask unless a window cuts in: in SDPA's causal mode a real query never
    # sees the padding after its span's last token.
    if not batch.from_cache and (sliding_window is None or max_n <= sliding_window):
        return None
    if batch.from_cache:
        query_pos = positions[batch.token_idx]  # (S, max_n)
    else:  # keys are the spans' own tokens, from position 0
        query_pos = torch.arange(max_n, device=positions.device).expand(spans, max_n)
    mask = visible_keys(query_pos.reshape(-1), batch.num_keys, sliding_window)
    return mask.view(spans, 1, max_n, batch.num_keys)


class PagedAttention(nn.Module):
    """Scaled dot-product attention of this rank's heads against the paged cache.

    Args:
        num_heads, num_kv_heads, head_dim: this rank's query and KV heads and their width.
        sliding_window: a key is visible only to the next ``sliding_window`` positions (the
            masks of the step's metadata apply it).
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
        self.kv_cache = torch.empty(2, num_kv_heads, 0, 1, head_dim)

    @staticmethod
    def cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's cache: (2, kv_heads, num_blocks, block_size, head_dim)."""
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    @property
    def num_blocks(self) -> int:
        """Blocks in this layer's cache."""
        return self.kv_cache.shape[2]

    def forward(self, q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (tokens, heads, d), kv (tokens, 2, kv_heads, d) -> (tokens, heads * d)."""
        slots = self.kv_cache.view(2, self.num_kv_heads, -1, self.head_dim)  # (2, kv, slots, d)
        slots.index_copy_(2, meta.slot_mapping, kv.permute(1, 2, 0, 3))
        if meta.all_decode:
            return self._decode(q, meta).reshape(q.shape[0], -1)
        out = torch.empty_like(q)
        if meta.decode_token_idx is not None:
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], meta)
        for batch in meta.prefills:
            out[batch.token_flat] = self._prefill(q, kv, batch)
        return out.reshape(q.shape[0], -1)

    def gather(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks of ``block_tables`` (S, blocks), one copy of them.

        Returns:
            k, v: each (kv_heads, S, blocks * block_size, d), contiguous.
        """
        _, kv_heads, num_blocks, block_size, d = self.kv_cache.shape
        rows = self.kv_cache.view(-1, block_size * d)  # (2 * kv * num_blocks, bs * d)
        first = torch.arange(2 * kv_heads, device=rows.device) * num_blocks  # (2 * kv,)
        index = (first.unsqueeze(1) + block_tables.reshape(1, -1)).reshape(-1)
        spans = block_tables.shape[0]
        # A row lookup: embedding's kernel copies these rows 4x faster than index_select's on CPU
        # (measured: 0.19 against 0.73 ms for 32 sequences of 128 tokens, 4 KV heads of 32).
        both = F.embedding(index, rows).view(2, kv_heads, spans, -1, d)  # (2, kv, S, L, d)
        return both[0], both[1]

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (B, heads, d) -> (B, heads, d), one new token per sequence, against its blocks.

        On CPU the compiled kernel of :mod:`mgpu.layers.cpu_kernels` reads the blocks in place
        (not inside ``torch.compile``, which cannot trace it); elsewhere :meth:`_decode_gathered`.
        """
        kernel = cpu_kernels.kernel_for(q, self.kv_cache)
        lens = meta.decode_context_lens
        if kernel is None or lens is None:
            return self._decode_gathered(q, meta)
        assert meta.decode_block_tables is not None
        return kernel.paged_decode(
            q.contiguous(),
            self.kv_cache,
            meta.decode_block_tables,
            lens,
            self.scale,
            self.softcap or 0.0,
            self.sliding_window or 0,
        )

    def _decode_gathered(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """:meth:`_decode` from one copy of the sequences' blocks (:meth:`gather`).

        Two matmuls batched over (kv_heads, B), each KV head's query group its rows: on CPU they
        are 1.2-1.5x faster than SDPA over the same keys (its flash kernel is tuned for long
        queries, not one token), and they take the soft cap as they are.
        """
        assert meta.decode_block_tables is not None and meta.decode_bias is not None
        batch = q.shape[0]
        k, v = self.gather(meta.decode_block_tables)  # (kv, B, L, d)
        group = self.num_heads // self.num_kv_heads
        qg = q.view(batch, self.num_kv_heads, group, self.head_dim).transpose(0, 1)  # (kv,B,g,d)
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32:  # see _sdpa
            qg, k, v = qg.float(), k.float(), v.float()
        scores = torch.matmul(qg * self.scale, k.transpose(-1, -2))  # (kv, B, g, L)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = (scores + meta.decode_bias).softmax(dim=-1, dtype=torch.float32)  # (kv, B, g, L)
        out = torch.matmul(probs.to(v.dtype), v)  # (kv, B, g, d)
        return out.transpose(0, 1).reshape(batch, self.num_heads, self.head_dim).to(dtype)

    def _prefill(self, q: torch.Tensor, kv: torch.Tensor, batch: PrefillBatch) -> torch.Tensor:
        """One batch of prefilling spans in one call: q (tokens, heads, d) and kv (tokens, 2,
        kv_heads, d) of the step -> (P, heads, d) for its P tokens, in ``token_flat`` order."""
        spans, max_n = batch.token_idx.shape
        qs = q[batch.token_idx].transpose(1, 2)  # (S, heads, max_n, d)
        if batch.from_cache:  # keys include cached context: read them from the cache
            assert batch.block_tables is not None
            k, v = self.gather(batch.block_tables)  # (kv, S, blocks * bs, d)
            keys = batch.num_keys
            k, v = k[:, :, :keys].transpose(0, 1), v[:, :, :keys].transpose(0, 1)  # (S,kv,L,d)
        else:  # keys are the spans' own new tokens
            kvs = kv[batch.token_idx]  # (S, max_n, 2, kv, d)
            k, v = kvs[:, :, 0].transpose(1, 2), kvs[:, :, 1].transpose(1, 2)  # (S, kv, n, d)
        out = self._sdpa(qs, k, v, batch.mask)  # (S, heads, max_n, d)
        flat = out.transpose(1, 2).reshape(spans * max_n, self.num_heads, self.head_dim)
        if flat.shape[0] == batch.rows.shape[0]:  # no padding
            return flat
        return flat[batch.rows]

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """SDPA of q (S, heads, n, d) over k, v (S, kv_heads, keys, d); grouped heads share a KV
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
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (S, heads, n, keys)
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:  # causal, queries and keys the same positions
            n = q.shape[-2]
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)  # (S, heads, n, d)
