"""Continuous batching over the paged KV cache. Pure Python: no processes, no tensors.

Every step the scheduler hands out a token budget (``max_num_batched_tokens``). Running sequences go
first, in admission order: a decoding sequence needs one token, a sequence still in its prompt takes
as much of the budget as it can (chunked prefill). Waiting sequences are admitted with what is left.
When the cache has no block for a running sequence, the most recently admitted one is pre-empted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later. Nothing is
ever dropped.

With prefix caching, a sequence being admitted first takes the cached blocks of its longest cached
prefix and starts computing after them; blocks are hashed into the cache once their tokens are
computed (seen at the next schedule, when the step that computed them has been collected), and
when a sequence finishes or is pre-empted.

With LoRA, one batch uses at most ``max_loras`` distinct adapters (the base model does not count):
a running or waiting sequence of another adapter waits for a later step, and the sequences behind
it go ahead (a waiting one keeps its place in the queue).

With async scheduling the engine schedules step N+1 while step N is in flight. A sequence whose
step-N chunk samples a token may then be *looked ahead*: step N+1 feeds it that token, which
the engine does not know yet (the workers fill it in, see ``DEFERRED_TOKEN``), at the position
after its known tokens::

    known tokens  t0 .. t(T-1)       computed: T-1 (step N feeds t(T-1) and samples tT)
    step N+1      feeds tT (deferred) at position T, samples t(T+1); needs blocks for T + 1 tokens

A looked-ahead sequence is in flight, so it is never pre-empted; when its blocks run out it just
waits for the next step. One whose step-N token will be its last (``max_tokens``, the context)
is not looked ahead; one that stops on that token for another reason (EOS, a stop string) has
its step-N+1 token dropped by the engine, as vLLM's async scheduling does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mgpu.config import SchedulerConfig
from mgpu.engine.block_manager import BlockManager
from mgpu.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """A sequence and how many of its pending tokens are computed this step.

    Attributes:
        seq: the sequence.
        num_tokens: tokens it feeds this step.
        samples: the chunk reaches the end of the sequence, so a token is sampled after it
            (fixed when scheduled: the sequence grows while the step is in flight).
        deferred: a looked-ahead decode (see the module docstring): the token it feeds is the one
            its step in flight samples, at position ``start_pos``.
        start_pos: position of the chunk's first token.
    """

    seq: Sequence
    num_tokens: int
    samples: bool = False
    deferred: bool = False
    start_pos: int = 0

    @classmethod
    def chunk_of(cls, seq: Sequence, num_tokens: int) -> ScheduledSeq:
        """The next ``num_tokens`` pending tokens of ``seq`` (its known tokens)."""
        start = seq.num_computed_tokens
        return cls(seq, num_tokens, start + num_tokens == seq.num_tokens, False, start)


@dataclass
class SchedulerOutput:
    """What to run this step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens fed to the model this step."""
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Decides, step by step, which sequences run and how many tokens each feeds."""

    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, max_loras: int | None = None
    ):
        self.config = config
        self.blocks = block_manager
        #: Most distinct LoRA adapters in one batch (None: no limit, no adapters served).
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks (cached ones stay cached)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.cache_full_blocks(seq)
        self.blocks.free(seq.block_table)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.cache_full_blocks(seq)  # so that resuming finds its own prefix cached
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule(
        self,
        busy: frozenset[int] | set[int] = frozenset(),
        max_seqs: int | None = None,
        lookahead: frozenset[int] | set[int] = frozenset(),
    ) -> SchedulerOutput:
        """Pick this step's batch (see the module docstring).

        Args:
            busy: ids of sequences in a step still in flight: they are neither scheduled nor
                pre-empted, so batches in flight at once are disjoint (but for ``lookahead``).
            max_seqs: most sequences in this batch (the engine cuts the running sequences into
                one micro-batch per pipeline stage).
            lookahead: ids of busy sequences whose step in flight samples: each decodes that
                token, still unknown, in this batch (async scheduling).
        """
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        limit = max_seqs if max_seqs is not None else self.config.max_num_seqs
        adapters: set[int] = set()
        for seq in list(self.running):
            if len(out.scheduled) >= limit:
                break
            if seq not in self.running:
                continue  # pre-empted below to make room for an older sequence
            if not self._adapter_fits(seq, adapters):
                continue  # its adapter would be one too many in this batch
            if seq.seq_id in busy and seq.seq_id not in lookahead:
                continue  # in flight
            self.blocks.cache_full_blocks(seq)  # what the last collected step computed
            if seq.seq_id in lookahead:
                if budget > 0 and self._look_ahead(seq):
                    out.scheduled.append(ScheduledSeq(seq, 1, True, True, seq.num_tokens))
                    budget -= 1
                    adapters.add(seq.lora_id)
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = [s for s in self.running if s.seq_id not in busy][-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.scheduled.append(ScheduledSeq.chunk_of(seq, n))
                budget -= n
                adapters.add(seq.lora_id)
        # Admit new work only when nothing had to be pre-empted: the cache is full otherwise.
        # Sequences whose adapter would be one too many are passed over, keeping their place.
        passed_over: list[Sequence] = []
        while self.waiting and not out.preempted and budget > 0:
            if len(self.running) >= self.config.max_num_seqs or len(out.scheduled) >= limit:
                break
            seq = self.waiting[0]
            if not self._adapter_fits(seq, adapters):
                passed_over.append(self.waiting.popleft())
                continue
            hit = self.blocks.allocate_prefix(seq)
            seq.num_computed_tokens = hit
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n):
                self.blocks.undo_prefix(seq, hit)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq.chunk_of(seq, n))
            budget -= n
            adapters.add(seq.lora_id)
        self.waiting.extendleft(reversed(passed_over))
        return out

    def _look_ahead(self, seq: Sequence) -> bool:
        """Whether a sequence in flight decodes its pending token in the next batch: not when
        that token will be its last, nor when no block is free for it (no pre-emption: it is in
        flight). Allocates the block it needs."""
        pending = seq.num_tokens + 1  # known tokens and the one its step in flight samples
        if len(seq.output_token_ids) + 1 >= seq.max_tokens or pending >= self.config.max_model_len:
            return False
        return self.blocks.allocate(seq.block_table, pending)

    def _adapter_fits(self, seq: Sequence, adapters: set[int]) -> bool:
        """Whether ``seq`` may join a batch already using ``adapters`` (0 is the base model)."""
        if self.max_loras is None or seq.lora_id == 0 or seq.lora_id in adapters:
            return True
        return len(adapters - {0}) < self.max_loras
