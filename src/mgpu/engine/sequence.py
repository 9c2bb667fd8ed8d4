"""A sequence: one completion being generated, with its tokens, KV blocks and stop state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mgpu.sampling import SampleResult, SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field-by-field: schedulers test membership every step
class Sequence:
    """One completion (a request with ``n`` > 1 has ``n`` sequences).

    ``num_computed_tokens`` counts the tokens whose keys and values are in the cache; the tokens
    after it are fed at the next step. Pre-emption frees the blocks and resets it to 0, so the
    prompt and everything generated so far are recomputed as one prefill when it is resumed.
    """

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    # The LoRA adapter it runs with (0: the base model), and the root of its prefix-cache hashes:
    # the adapter's own, since its keys and values differ from the base model's for equal tokens.
    lora_id: int = 0
    cache_salt: bytes = b""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache hashes of the leading full blocks of ``block_table`` (see engine.block_manager).
    block_hashes: list[bytes] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[SampleResult] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    output_text: str = ""
    # A token was appended that ``output_text`` does not show yet (the engine detokenises later).
    pending_text: bool = False
    # Incremental detokenisation offsets into ``all_token_ids`` (see engine.detokenizer).
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        self.read_offset = len(self.prompt_token_ids)
        self.prefix_offset = max(0, self.read_offset - 6)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """Whether the sequence has stopped."""
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished with an OpenAI ``finish_reason`` (stop, length, abort)."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
