"""The scheduler and block manager, in pure Python."""

from __future__ import annotations

from mgpu.config import SchedulerConfig
from mgpu.engine.block_manager import BlockManager
from mgpu.engine.scheduler import Scheduler
from mgpu.engine.sequence import Sequence, SequenceStatus
from mgpu.sampling import SamplingParams


def seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(i, f"r{i}", 0, list(range(prompt_len)), SamplingParams(), max_tokens=100)


def run_step(sched: Scheduler) -> list[tuple[int, int, bool]]:
    """Schedule, then pretend the model ran: advance computed tokens, append a token if sampled."""
    out = sched.schedule()
    done = []
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_tokens
        if samples:
            item.seq.output_token_ids.append(1)
        done.append((item.seq.seq_id, item.num_tokens, samples))
    return done


def test_block_manager_allocates_and_frees() -> None:
    bm = BlockManager(4, 16)
    table: list[int] = []
    assert bm.allocate(table, 17) and len(table) == 2
    assert bm.allocate(table, 32) and len(table) == 2
    assert not bm.allocate(table, 80) and len(table) == 2
    assert bm.usage == 0.5
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 4


def test_chunked_prefill_under_token_budget() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=10, max_model_len=64), BlockManager(16, 4)
    )
    a, b = seq(0, 25), seq(1, 3)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [(0, 10, False)]
    assert run_step(sched) == [(0, 10, False)]
    # a finishes its prompt (5 tokens) and b is admitted with the rest of the budget.
    assert run_step(sched) == [(0, 5, True), (1, 3, True)]
    assert run_step(sched) == [(0, 1, True), (1, 1, True)]


def test_max_num_seqs_limits_the_batch() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 4))
    for i in range(3):
        sched.add(seq(i, 4))
    assert [s for s, _, _ in run_step(sched)] == [0, 1]
    sched.finish(sched.running[0])
    assert [s for s, _, _ in run_step(sched)] == [1, 2]


def test_preempts_newest_and_recomputes() -> None:
    # 4 blocks of 4 tokens: two sequences of 7 tokens fit, then both need a third block.
    sched = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(4, 4))
    a, b = seq(0, 7), seq(1, 7)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 8 tokens each now (7 + 1 sampled) -> 2 blocks each
    out = run_step(sched)  # each feeds token 8 -> fits in block 2
    assert out == [(0, 1, True), (1, 1, True)]
    out = sched.schedule()  # token 9 needs a third block: b (newest) is pre-empted
    assert [p.seq_id for p in out.preempted] == [1]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.num_preemptions == 1
    assert [s.seq.seq_id for s in out.scheduled] == [0]
    # Once a finishes, b is recomputed from scratch: prompt and generated tokens in one prefill.
    out.scheduled[0].seq.num_computed_tokens += 1
    sched.finish(a)
    out = run_step(sched)
    assert out == [(1, 9, True)]


def test_never_drops_a_sequence_that_fits_alone() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(5, 4))
    seqs = [seq(i, 6) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        run_step(sched)
        for s in list(sched.running):
            if len(s.output_token_ids) >= 8 and s.num_computed_tokens == s.num_tokens - 1:
                s.finish("length")
                sched.finish(s)
    assert not sched.has_unfinished()
    assert all(len(s.output_token_ids) >= 8 for s in seqs)


def test_lookahead_decodes_the_pending_token() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(3, 4))
    a = seq(0, 4)  # a 4-token prompt fills one block
    sched.add(a)
    [first] = sched.schedule().scheduled
    assert (first.num_tokens, first.samples, first.deferred, first.start_pos) == (4, True, False, 0)
    # Its prefill in flight, a decodes the token it samples at position 4, in a second block.
    [ahead] = sched.schedule(busy={0}, lookahead={0}).scheduled
    assert (ahead.num_tokens, ahead.samples, ahead.deferred, ahead.start_pos) == (1, True, True, 4)
    assert len(a.block_table) == 2
    # Once the prefill is collected, the looked-ahead step is the one in flight: the next one
    # looks ahead of it, one position further.
    a.num_computed_tokens, a.output_token_ids = 4, [1]
    [again] = sched.schedule(busy={0}, lookahead={0}).scheduled
    assert again.deferred and again.start_pos == 5


def test_lookahead_never_preempts_and_skips_last_tokens() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(2, 4))
    a, b = seq(0, 4), seq(1, 4)
    sched.add(a)
    sched.add(b)
    assert len(sched.schedule().scheduled) == 2  # one block each: the cache is full
    # Both in flight and both would need a second block: neither is looked ahead, and neither is
    # pre-empted for the other (they are in flight).
    out = sched.schedule(busy={0, 1}, lookahead={0, 1})
    assert out.scheduled == [] and out.preempted == [] and sched.running == [a, b]
    # A sequence whose pending token is its last is not looked ahead.
    last = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(4, 4))
    c = Sequence(2, "r2", 0, [1, 2, 3], SamplingParams(), max_tokens=1)
    last.add(c)
    last.schedule()
    assert last.schedule(busy={2}, lookahead={2}).scheduled == []
    # Nor one whose pending token fills the context.
    edge = Scheduler(SchedulerConfig(max_model_len=8), BlockManager(4, 4))
    d = seq(3, 7)
    edge.add(d)
    edge.schedule()
    assert edge.schedule(busy={3}, lookahead={3}).scheduled == []
