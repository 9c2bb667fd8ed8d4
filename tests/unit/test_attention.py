"""Paged attention (decode read in place, prefill batched) against the per-sequence gather path.

The reference is the path the engine used before: for each sequence on its own, gather its keys
and values token by token from the cache through its block table, and attend with a causal mask
offset by its start position (window, soft cap and grouped heads applied densely). On CPU, decode
runs both ways: through the compiled kernel that reads the cache in place (the default) and
through the PyTorch gather path it replaces (``MGPU_CPU_KERNELS=0``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgpu.engine.messages import SeqChunk
from mgpu.engine.model_runner import step_tensors
from mgpu.layers import cpu_kernels
from mgpu.layers.attention import PagedAttention

BLOCK = 4
NUM_BLOCKS = 64
HEADS, KV_HEADS, DIM = 4, 2, 8


def gather_reference(
    attn: PagedAttention, q: torch.Tensor, chunks: list[SeqChunk], window: int | None
) -> torch.Tensor:
    """(tokens, heads * d) attention of each chunk's queries over its sequence's cached keys."""
    group = attn.num_heads // attn.num_kv_heads
    cache = attn.kv_cache.float()  # (2, kv, blocks, bs, d)
    outs, offset = [], 0
    for chunk in chunks:
        ctx = chunk.start_pos + len(chunk.token_ids)
        slots = [(chunk.block_table[p // BLOCK], p % BLOCK) for p in range(ctx)]
        k = torch.stack([cache[0, :, b, i] for b, i in slots], dim=1)  # (kv, ctx, d)
        v = torch.stack([cache[1, :, b, i] for b, i in slots], dim=1)
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (heads, ctx, d)
        for j, pos in enumerate(range(chunk.start_pos, ctx)):
            query = q[offset + j].float()  # (heads, d)
            scores = torch.einsum("hd,hkd->hk", query, k) * attn.scale  # (heads, ctx)
            if attn.softcap is not None:
                scores = torch.tanh(scores / attn.softcap) * attn.softcap
            keys = torch.arange(ctx)
            visible = keys <= pos
            if window is not None:
                visible &= keys > pos - window
            scores = scores.masked_fill(~visible, float("-inf"))
            outs.append(torch.einsum("hk,hkd->hd", scores.softmax(-1), v).reshape(-1))
        offset += len(chunk.token_ids)
    return torch.stack(outs)


def run_steps(
    dtype: torch.dtype,
    device: torch.device,
    window: int | None,
    softcap: float | None,
    steps: list[list[tuple[int, int, int]]],
) -> None:
    """Run ``steps`` of (sequence, start_pos, new tokens) chunks through one layer; every step's
    output must match the gather reference."""
    torch.manual_seed(0)
    attn = PagedAttention(HEADS, KV_HEADS, DIM, sliding_window=window, softcap=softcap)
    shape = attn.cache_shape(NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    attn.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    blocks = list(range(NUM_BLOCKS))
    random.Random(0).shuffle(blocks)  # tables far from contiguous
    tables = {seq: blocks[seq * 12 : (seq + 1) * 12] for seq in range(5)}
    for step in steps:
        chunks = [SeqChunk(s, [3] * n, start, tables[s], True) for s, start, n in step]
        _, _, meta = step_tensors(chunks, BLOCK, 1024, window, device)
        tokens = sum(n for _, _, n in step)
        q = torch.randn(tokens, HEADS, DIM, device=device).to(dtype)
        kv = torch.randn(tokens, 2, KV_HEADS, DIM, device=device).to(dtype)
        out = attn(q, kv, meta)  # writes kv into the cache first, as the reference expects
        expected = gather_reference(attn, q.cpu(), chunks, window)
        atol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=atol)


#: Prefills of mixed lengths (one longer than the window), then mixed steps: decodes next to a
#: chunked prefill continuing from its cache and a new prompt, then decodes alone.
STEPS = [
    [(0, 0, 7), (1, 0, 3), (2, 0, 11)],
    [(0, 7, 1), (1, 3, 1), (2, 11, 5), (3, 0, 6)],
    [(0, 8, 1), (1, 4, 1), (2, 16, 1), (3, 6, 1)],
    [(0, 9, 1), (3, 7, 4), (4, 0, 1)],
    [(0, 10, 1), (1, 5, 1), (2, 17, 1), (3, 11, 1), (4, 1, 1)],
]
CPU = torch.device("cpu")


@pytest.fixture(params=["kernel", "gather"])
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Decode through the in-place CPU kernel, or through the gather path (the kernel off); the
    other path is made to fail, so a test cannot pass on the wrong one."""
    if request.param == "kernel":
        assert cpu_kernels.kernel() is not None, "the CPU paged-attention kernel did not build"

        def refuse(*_: object) -> None:
            raise AssertionError("decode took the gather path")

        monkeypatch.setattr(PagedAttention, "_decode_gathered", refuse)
    else:
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, None), (None, 3.0), (6, 2.0)])
def test_paged_attention_matches_gather_path(
    dtype: torch.dtype, window: int | None, softcap: float | None, decode_path: str
) -> None:
    run_steps(dtype, CPU, window, softcap, STEPS)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(4, 4, 64), (8, 1, 128), (6, 2, 80), (2, 1, 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_gather_path_it_replaces(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    """The kernel against :meth:`PagedAttention._decode_gathered` on the same step: head widths
    with their own compiled loops (64, 128) and without (80, 8), grouped and plain heads, contexts
    ending mid-block and at a block's end, tables padded to the longest, a window."""
    kernel = cpu_kernels.kernel()
    assert kernel is not None
    torch.manual_seed(1)
    for window in (None, 7):
        attn = PagedAttention(heads, kv_heads, dim, sliding_window=window)
        attn.kv_cache = torch.randn(attn.cache_shape(40, BLOCK, kv_heads, dim)).to(dtype)
        blocks = list(range(40))
        random.Random(1).shuffle(blocks)
        contexts = [1, 4, 9, 30]  # tokens already cached before this step's one
        chunks = [
            SeqChunk(i, [3], ctx, blocks[i * 9 : (i + 1) * 9], True)
            for i, ctx in enumerate(contexts)
        ]
        _, _, meta = step_tensors(chunks, BLOCK, 1024, window, CPU)
        q = torch.randn(len(contexts), heads, dim).to(dtype)
        expected = attn._decode_gathered(q, meta)
        got = attn._decode(q, meta)
        assert got.dtype == dtype and got.shape == expected.shape
        atol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)


def test_kernel_build_failure_keeps_the_gather_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A machine that cannot build the kernel gets a warning saying what to do, and None."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this build fails\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", [broken])
    monkeypatch.setattr(cpu_kernels, "NAME", "mgpu_cpu_kernels_broken")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with caplog.at_level("WARNING", logger="mgpu.layers.cpu_kernels"):
        assert cpu_kernels._build.__wrapped__() is None
    assert "gathers the cache instead" in caplog.text and "g++" in caplog.text


def test_kernel_off_by_environment() -> None:
    """``MGPU_CPU_KERNELS=0``, read when the module is imported (as a worker does at its start)."""
    code = (
        "import torch; from mgpu.layers import cpu_kernels; "
        "assert not cpu_kernels.ENABLED and cpu_kernels.kernel() is None; "
        "assert cpu_kernels.kernel_for(torch.ones(1)) is None"
    )
    env = {**os.environ, "MGPU_CPU_KERNELS": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_single_fresh_prompt_and_padding(decode_path: str) -> None:
    """One prompt alone (SDPA's causal mode), one cut by its window, spans padded to the
    longest, and a one-token prompt (prefill of one token)."""
    run_steps(torch.float32, CPU, None, None, [[(0, 0, 9)], [(1, 0, 1), (2, 0, 13)]])
    run_steps(torch.float32, CPU, 4, None, [[(0, 0, 9)], [(0, 9, 1)]])


def test_decode_reads_one_copy_laid_out_for_the_matmuls() -> None:
    attn = PagedAttention(HEADS, KV_HEADS, DIM)
    attn.kv_cache = torch.randn(attn.cache_shape(NUM_BLOCKS, BLOCK, KV_HEADS, DIM))
    tables = torch.tensor([[5, 2], [9, 0]])
    k, v = attn.gather(tables)
    assert k.shape == (KV_HEADS, 2, 2 * BLOCK, DIM) and k.is_contiguous() and v.is_contiguous()
    assert torch.equal(k[1, 0, BLOCK:], attn.kv_cache[0, 1, 2])
    assert torch.equal(v[0, 1, :BLOCK], attn.kv_cache[1, 0, 9])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_on_cuda(dtype: torch.dtype) -> None:
    run_steps(dtype, torch.device("cuda"), 5, None, STEPS)
    run_steps(dtype, torch.device("cuda"), None, 3.0, STEPS)


def test_a_long_prompt_is_not_padded_next_to_short_ones() -> None:
    """Spans join one batch while padding at most doubles its attention work: the 3-token prompt
    fits beside the two long ones (their work dominates), the 2-token ones do not."""
    lengths = [40, 36, 3, 2, 2]
    chunks = [
        SeqChunk(i, [3] * n, 0, list(range(i * 12, (i + 1) * 12)), True)
        for i, n in enumerate(lengths)
    ]
    _, _, meta = step_tensors(chunks, BLOCK, 1024, None, CPU)
    assert [tuple(b.token_idx.shape) for b in meta.prefills] == [(3, 40), (2, 2)]
    assert sorted(torch.cat([b.token_flat for b in meta.prefills]).tolist()) == list(range(83))


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    """A lock left by a process killed mid-build would make every later start wait forever."""
    lock = tmp_path / "lock"
    lock.touch()
    assert not cpu_kernels.clear_stale_lock(tmp_path) and lock.exists()
    old = lock.stat().st_mtime - cpu_kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cpu_kernels.clear_stale_lock(tmp_path) and not lock.exists()
    assert not cpu_kernels.clear_stale_lock(tmp_path)
