"""Paged KV-cache bookkeeping: fixed-size blocks, one block table per sequence, and a prefix cache.

Prefix caching (vLLM's automatic prefix caching): a block that is full of computed tokens gets a
hash of its token ids and of the hash of the block before it, so equal hashes mean equal prefixes
up to and including the block. A new sequence whose prompt starts with cached blocks takes them
(their reference count goes up) and computes only the rest. A block whose last user leaves keeps
its keys and values and its hash and waits in the free queue, least recently freed first; it is
evicted (its hash forgotten) only when the pool has to hand it out again::

    hashes:  h0 = H(-, t[0:16])   h1 = H(h0, t[16:32])   h2 = H(h1, t[32:48])   (partial: none)
    seq A:   [ 7 ]                [ 3 ]                  [ 9 ]                  [ 4 ]
    seq B:   [ 7 ]                [ 3 ]                  [ 12 ] (differs here)  ...
             ref 2                ref 2                  ref 1 each

A cached block is never written again: a sequence writes only at positions after its cached
prefix, which lie in blocks it holds alone.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from mgpu.config import blocks_for_tokens
from mgpu.engine.sequence import Sequence

#: Hash of "no block before this one".
_ROOT = b""


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: SHA-256 of the previous block's hash and this block's tokens.

    A cryptographic hash, as vLLM offers, so that two different prefixes never share blocks.

    Args:
        parent: the hash of the block before it (``b""`` for the first block).
        token_ids: the block's tokens.
    """
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    """Hands out KV blocks and keeps the prefix cache. Pure Python; the tensors live in the workers.

    Args:
        num_blocks: blocks in the cache (the same on every rank).
        block_size: tokens per block.
        enable_prefix_caching: share full blocks of equal prefixes between sequences.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Blocks no sequence holds, in eviction order (first = evicted first); value unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_count = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> block id holding that prefix
        self.num_queried_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.num_hit_tokens = 0  # of those, tokens found cached (vLLM's prefix-cache counters)

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence (cached ones among them can be evicted)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a hashed prefix (held or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block: int) -> int:
        """Sequences holding ``block``."""
        return self._ref_count[block]

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the table can grow to hold ``num_tokens`` tokens now."""
        return self.blocks_needed(block_table, num_tokens) <= len(self._free)

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` in place to hold ``num_tokens`` tokens; False if blocks run out.

        New blocks come from the front of the free queue; a cached one is evicted on the way.
        """
        need = self.blocks_needed(block_table, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            old = self._hash_of[block]
            if old is not None:
                del self._cached[old]
                self._hash_of[block] = None
            self._ref_count[block] = 1
            block_table.append(block)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop the table's hold on each block and empty it.

        A cached block nobody holds any more joins the back of the free queue, last block of the
        table first, so that a prefix's tail is evicted before its head; an uncached one goes to
        the front.
        """
        for block in reversed(block_table):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                self._free[block] = None
                if self._hash_of[block] is None:  # nothing worth keeping: hand it out first
                    self._free.move_to_end(block, last=False)
        block_table.clear()

    # ---- prefix cache -------------------------------------------------------------------------

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix.

        The last token is never taken from the cache, so that the model runs at least once and
        samples. Counts the lookup in ``num_queried_tokens`` and ``num_hit_tokens``.

        Args:
            seq: a sequence about to be admitted (empty block table).

        Returns:
            The tokens now cached for it (a multiple of the block size): its computed tokens.
        """
        if not self.enable_prefix_caching:
            return 0
        assert not seq.block_table, "allocate_prefix needs a sequence without blocks"
        tokens, bs = seq.all_token_ids, self.block_size
        seq.block_hashes = []
        parent = seq.cache_salt or _ROOT  # an adapter's prefixes are its own
        for i in range((len(tokens) - 1) // bs):
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            block = self._cached.get(h)
            if block is None:
                break
            if self._ref_count[block] == 0:
                del self._free[block]
            self._ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        hit = len(seq.block_table) * bs
        self.num_queried_tokens += len(tokens)
        self.num_hit_tokens += hit
        return hit

    def undo_prefix(self, seq: Sequence, hit_tokens: int) -> None:
        """Take back an :meth:`allocate_prefix` whose sequence could not be admitted after all.

        Args:
            seq: the sequence.
            hit_tokens: what :meth:`allocate_prefix` returned.
        """
        if not self.enable_prefix_caching:
            return
        self.free(seq.block_table)
        seq.block_hashes = []
        self.num_queried_tokens -= seq.num_tokens
        self.num_hit_tokens -= hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash the sequence's blocks that are full of computed tokens and not hashed yet.

        Call only when ``seq.num_computed_tokens`` counts tokens whose keys and values the
        workers have written (or will have written before any later step reads them). A block
        whose prefix another block already caches stays private and is freed as usual.

        Args:
            seq: the sequence.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        hashes = seq.block_hashes
        if len(hashes) >= full:
            return
        tokens = seq.all_token_ids
        parent = hashes[-1] if hashes else seq.cache_salt or _ROOT
        for i in range(len(hashes), full):
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = seq.block_table[i]
            if h not in self._cached and self._hash_of[block] is None:
                self._cached[h] = block
                self._hash_of[block] = h
            parent = h

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay with their sequences)."""
        self._cached.clear()
        self._hash_of = [None] * self.num_blocks
