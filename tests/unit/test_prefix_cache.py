"""Prefix caching in the block manager and scheduler, in pure Python."""

from __future__ import annotations

from mgpu.config import SchedulerConfig
from mgpu.engine.block_manager import BlockManager, block_hash
from mgpu.engine.scheduler import Scheduler
from mgpu.engine.sequence import Sequence
from mgpu.sampling import SamplingParams

BS = 4


def seq(i: int, prompt: list[int]) -> Sequence:
    return Sequence(i, f"r{i}", 0, list(prompt), SamplingParams(), max_tokens=100)


def run_step(sched: Scheduler) -> list[tuple[int, int, int]]:
    """Schedule, pretend the model ran; returns (seq id, start position, tokens fed)."""
    out = sched.schedule()
    done = []
    for item in out.scheduled:
        samples = item.samples
        done.append((item.seq.seq_id, item.seq.num_computed_tokens, item.num_tokens))
        item.seq.num_computed_tokens += item.num_tokens
        if samples:
            item.seq.output_token_ids.append(7)
    return done


def test_hash_chains_the_blocks_before() -> None:
    a = block_hash(b"", [1, 2, 3, 4])
    assert a == block_hash(b"", [1, 2, 3, 4]) != block_hash(b"", [1, 2, 3, 5])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(b"", [0, 2, 3, 4]), [5, 6, 7, 8])


def test_shared_blocks_are_freed_only_when_the_last_user_leaves() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    prompt = list(range(10))  # two full blocks and a partial one
    a = seq(0, prompt)
    assert bm.allocate_prefix(a) == 0
    assert bm.allocate(a.block_table, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 2
    b = seq(1, prompt)
    assert bm.allocate_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert bm.allocate(b.block_table, 10) and b.block_table[2] != a.block_table[2]
    assert bm.num_free_blocks == 4
    bm.free(a.block_table)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 5  # only a's private last block came back
    shared = list(b.block_table[:2])
    bm.free(b.block_table)
    assert bm.num_free_blocks == 8 and all(bm.ref_count(x) == 0 for x in shared)
    # Free but still cached: a third request finds them.
    c = seq(2, [*prompt, 99, 98])
    assert bm.allocate_prefix(c) == 8 and c.block_table == shared
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (10 + 10 + 12, 8 + 8)


def test_least_recently_freed_is_evicted_first_and_uncached_before_cached() -> None:
    bm = BlockManager(5, BS, enable_prefix_caching=True)
    old, new = seq(0, list(range(9))), seq(1, list(range(100, 109)))
    for s in (old, new):
        bm.allocate_prefix(s)
        bm.allocate(s.block_table, 8)
        s.num_computed_tokens = 8
        bm.cache_full_blocks(s)
    scratch: list[int] = []
    bm.allocate(scratch, 1)
    bm.free(old.block_table)
    bm.free(new.block_table)
    bm.free(scratch)  # uncached: to the front of the queue, although freed last
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 5
    # Two fresh blocks: the uncached one, then the least recently freed: the tail of `old`.
    table: list[int] = []
    assert bm.allocate(table, 2 * BS)
    assert bm.num_cached_blocks == 3
    assert bm.allocate_prefix(seq(2, list(range(9)))) == 4  # old's head block is still there
    assert bm.allocate_prefix(seq(3, list(range(100, 109)))) == 8


def test_the_last_token_is_always_computed() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = seq(0, list(range(8)))  # exactly two blocks
    bm.allocate_prefix(a)
    bm.allocate(a.block_table, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    assert bm.allocate_prefix(seq(1, list(range(8)))) == 4  # the second block holds the last


def test_scheduler_starts_after_the_cached_prefix() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_model_len=64),
        BlockManager(16, BS, enable_prefix_caching=True),
    )
    system = list(range(50, 62))  # three full blocks
    a = seq(0, [*system, 1, 2])
    sched.add(a)
    assert run_step(sched) == [(0, 0, 14)]
    assert run_step(sched) == [(0, 14, 1)]  # decoding; a's three prompt blocks are now cached
    b = seq(1, [*system, 3])
    sched.add(b)
    assert run_step(sched) == [(0, 15, 1), (1, 12, 1)]  # b feeds only its own token
    assert b.block_table[:3] == a.block_table[:3]
    sched.finish(a)
    assert all(sched.blocks.ref_count(x) == 1 for x in b.block_table[:3])


def test_off_means_no_sharing() -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(16, BS))
    for i in range(2):
        sched.add(seq(i, list(range(13))))
        run_step(sched)
    assert sched.blocks.num_cached_blocks == 0
    assert sched.blocks.num_queried_tokens == 0
    assert not set(sched.running[0].block_table) & set(sched.running[1].block_table)


def test_admission_that_fails_takes_back_its_prefix() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_model_len=64), bm)
    a = seq(0, list(range(9)))
    sched.add(a)
    run_step(sched)
    run_step(sched)  # a holds 3 blocks, two of them cached
    b = seq(1, [*range(8), 50, 51, 52, 53, 54])  # shares 2 blocks, needs 2 more: only 1 free
    sched.add(b)
    run_step(sched)
    assert b.block_table == [] and b.num_computed_tokens == 0 and b in sched.waiting
    assert [bm.ref_count(x) for x in a.block_table] == [1, 1, 1]
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (9, 0)


def test_on_by_default_and_off_from_the_command_line() -> None:
    from mgpu.cli import build_parser, engine_args

    parser = build_parser()
    on = engine_args(parser.parse_args(["serve"]))
    off = engine_args(parser.parse_args(["serve", "--no-enable-prefix-caching"]))
    explicit = engine_args(parser.parse_args(["serve", "--enable-prefix-caching"]))
    assert on.enable_prefix_caching and explicit.enable_prefix_caching
    assert not off.enable_prefix_caching
    assert off.engine_kwargs()["enable_prefix_caching"] is False
    assert on.ignored() is None
