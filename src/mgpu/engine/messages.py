"""The small picklable messages the engine sends its workers, one per step (STYLE.md convention 6).

Tensors never travel this way: only token ids, positions and block ids. Workers build their own
input
tensors from them, and activations move between ranks through ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mgpu.sampling import SamplingParams

#: The token id of a looked-ahead decode chunk (async scheduling): the engine does not know it
#: yet, and the workers feed the token their previous step sampled for the sequence instead.
DEFERRED_TOKEN = -1


@dataclass
class SeqChunk:
    """One sequence's share of a step.

    Attributes:
        seq_id: the sequence.
        token_ids: tokens fed this step: a prompt chunk, or the last sampled token when decoding
            (``[DEFERRED_TOKEN]``: the token the sequence's previous step samples, which the
            engine schedules before it knows it).
        start_pos: position of ``token_ids[0]`` (tokens before it are already in the KV cache).
        block_table: the sequence's KV blocks, covering at least ``start_pos + len(token_ids)``.
        sample: sample a next token after this chunk (false for a non-final prefill chunk).
        lora_id: the LoRA adapter the sequence runs with (0: the base model).
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    lora_id: int = 0

    @property
    def is_deferred(self) -> bool:
        """A looked-ahead decode: its one token is the one its previous step sampled."""
        ids = self.token_ids  # no list built: asked of every chunk of every step
        return len(ids) == 1 and ids[0] == DEFERRED_TOKEN

    def check_positions(self, max_positions: int) -> None:
        """Refuse a chunk reaching past the model's ``max_position_embeddings`` (ValueError)."""
        last = self.start_pos + len(self.token_ids) - 1
        if last >= max_positions:
            raise ValueError(f"position {last} is beyond the model's {max_positions} positions")


@dataclass
class StepInput:
    """Everything the workers need for one forward pass of the running batch.

    ``lora_slots`` is the adapter id held by each LoRA device slot for this step (empty without
    LoRA); the workers expand the chunks' ``lora_id`` into per-token slot indices.
    """

    chunks: list[SeqChunk]
    new_seqs: dict[int, SamplingParams] = field(default_factory=dict)
    finished_seqs: list[int] = field(default_factory=list)
    lora_slots: tuple[int, ...] = ()
