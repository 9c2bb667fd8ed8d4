"""Tensor-parallel building blocks: each layer allocates only its own shard (STYLE.md, 1)."""
