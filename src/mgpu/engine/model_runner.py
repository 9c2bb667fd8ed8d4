"""Per-rank model runner: builds this rank's shard, owns its KV cache, runs steps.

Runs inside a worker process (see :mod:`mgpu.engine.worker`). The code is the same on CPU (gloo) and
CUDA (NCCL); only the device and the collective backend differ.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from mgpu.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, blocks_for_tokens
from mgpu.distributed import parallel_state as ps
from mgpu.distributed.communication import pp_recv, pp_send, tp_broadcast_tokens
from mgpu.engine.cuda_graph import (
    GRAPH_EXEC_BYTES,
    DecodeGraphs,
    GraphReport,
    batch_sizes,
    block_widths,
    graph_shapes,
    uncapturable,
)
from mgpu.engine.forward_context import ForwardContext, LoRAMapping, set_forward_context
from mgpu.engine.messages import SeqChunk, StepInput
from mgpu.layers import cpu_kernels
from mgpu.layers.attention import (
    AttentionMetadata,
    PagedAttention,
    PrefillBatch,
    window_metadata,
)
from mgpu.layers.matmul import keep_plain_weights
from mgpu.layers.moe import expert_parallel
from mgpu.layers.quantization import quant_config_for, quantization_scope
from mgpu.memory import kv_bytes_per_token
from mgpu.models.loader import load_weights
from mgpu.models.registry import model_class
from mgpu.monitor.timing import TIMER
from mgpu.sampling import Sampler, SampleResult

if TYPE_CHECKING:
    from mgpu.lora.adapter import AdapterInfo
    from mgpu.lora.manager import LoRAManager

#: Test-only setting ``RANK:SECONDS``: that rank sleeps this long in every step, which makes the
#: layout uneven on purpose (the monitor's imbalance tests).
SLOW_RANK_ENV = "MGPU_TEST_SLOW_RANK"

# Memory the runtime itself needs beyond tensors we can count (allocator slack, CUDA context,
# gloo/NCCL buffers), kept out of the KV budget.
_RUNTIME_RESERVE_BYTES = 256 * 2**20


@dataclass
class RankReport:
    """What a rank tells the engine after loading: the numbers behind the startup table."""

    rank: int
    tp_rank: int
    pp_rank: int
    layer_range: tuple[int, int]
    param_bytes: int
    kv_bytes_per_token: int
    resident_bytes: int
    device: str


class ModelRunner:
    """One rank's model shard, KV cache and (on the output rank) sampler.

    Args:
        model_path: the model directory.
        model_config: the architecture.
        parallel_config: the layout; this process's place in it comes from ``parallel_state``.
        device: torch device of this rank.
        dtype: weights and activations dtype.
        rank: global rank.
        cache_config: KV-cache settings (block size, memory budget).
        compile_decode: run decode-only steps through ``torch.compile`` (see ``_forward``).
        quantization: ``--quantization`` of the weights (None: as stored in the checkpoint).
    """

    def __init__(
        self,
        model_path: Path,
        model_config: ModelConfig,
        parallel_config: ParallelConfig,
        device: torch.device,
        dtype: torch.dtype,
        rank: int,
        cache_config: CacheConfig,
        compile_decode: bool = False,
        quantization: str | None = None,
    ):
        self.config, self.device, self.dtype, self.rank = model_config, device, dtype, rank
        pp_rank, pp_size = ps.get_pp_rank(), ps.get_pp_size()
        self.layer_range = parallel_config.layer_range(model_config, pp_rank)
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp_size - 1
        self.is_output_rank = self.is_last and ps.get_tp_rank() == 0
        cls = model_class(model_config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            quant_config = quant_config_for(model_path, quantization)
            with (
                torch.device(device),
                expert_parallel(parallel_config.enable_expert_parallel),
                quantization_scope(quant_config),
            ):
                self.model = cls(model_config, self.layer_range, self.is_first, self.is_last)
        finally:
            torch.set_default_dtype(previous)
        with keep_plain_weights() if compile_decode else contextlib.nullcontext():
            load_weights(self.model, model_path, progress=rank == 0)
        self.model.eval()
        # Decode steps are the steady state and all look alike (one token per sequence), so they
        # are what compilation pays off on: one fused graph instead of ~40 kernels per layer,
        # whose launch overhead dominates small models on CPU and on GPU alike. Steps with a
        # prefill stay eager: their padded shapes change from step to step.
        self._decode_model = torch.compile(self.model, dynamic=True) if compile_decode else None
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        if device.type == "cpu":  # loaded now, not in the first step
            cpu_kernels.kernel()
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.sampler = Sampler(model_config.vocab_size, device) if self.is_output_rank else None
        # On the output rank: each sequence's newest sampled token, which a looked-ahead chunk
        # of the next step feeds (async scheduling, ``_fill_deferred``).
        self._sampled: dict[int, int] = {}
        # Sends of hidden states to the next stage still in progress, with the tensors they read.
        self._sends: list[tuple[torch.distributed.Work, torch.Tensor]] = []
        TIMER.use_cuda(device.type == "cuda")
        self._slow_s = _test_slow_seconds(rank)
        self.lora: LoRAManager | None = None
        #: Graph-shaped decode steps (``prepare_decode_graphs``), and the block their padding
        #: rows use, beyond the engine's blocks (``allocate_kv_cache``).
        self.graphs: DecodeGraphs | None = None
        self.scratch_block: int | None = None

    def load_lora(self, adapters: list[AdapterInfo], max_loras: int, max_lora_rank: int) -> int:
        """Attach LoRA slots to the targeted linears and read this rank's adapter shards.

        Called by the engine before the memory profile, so the slots count against the budget.
        Returns the slots' device bytes.
        """
        from mgpu.lora.manager import LoRAManager

        self.lora = LoRAManager(
            self.model, adapters, max_loras, max_lora_rank, self.dtype, self.device
        )
        return self.lora.slot_bytes()

    # ---- memory -------------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes on this rank (the planner's formula)."""
        return kv_bytes_per_token(
            self.config,
            self.layer_range[1] - self.layer_range[0],
            ps.get_tp_size(),
            torch.finfo(self.dtype).bits // 8,
        )

    def param_bytes(self) -> int:
        """Bytes of parameters this rank holds (tied parameters counted once), LoRA slots too."""
        lora = self.lora.slot_bytes() if self.lora is not None else 0
        return lora + sum(p.numel() * p.element_size() for p in self.model.parameters())

    def report(self) -> RankReport:
        """Numbers for the engine's startup table and the per-rank memory test."""
        return RankReport(
            rank=self.rank,
            tp_rank=ps.get_tp_rank(),
            pp_rank=ps.get_pp_rank(),
            layer_range=self.layer_range,
            param_bytes=self.param_bytes(),
            kv_bytes_per_token=self.kv_bytes_per_token(),
            resident_bytes=psutil.Process(os.getpid()).memory_info().rss,
            device=str(self.device),
        )

    def profile_num_blocks(
        self,
        sched: SchedulerConfig,
        world_size: int,
        graph_mode: str | None = None,
    ) -> int:
        """How many KV blocks fit this rank's budget after a profiling forward pass.

        The budget is ``gpu_memory_utilization`` x device memory (on CPU: ``--device-memory`` or the
        available RAM, shared by the ranks). The profiling pass runs the largest step the scheduler
        can issue, so its activation peak is measured, not guessed. The count is capped at what the
        scheduler can ever use: ``max_num_seqs`` sequences at ``max_model_len``.

        With graph-shaped decode steps (``graph_mode``) the budget leaves the scratch block, and
        with CUDA graphs what capture will hold: the graphs share one memory pool, which keeps the
        activations of the largest graph (the shape gathering most keys) for good, beside the
        eager allocator's; a decode step of that shape is profiled for it, plus
        :data:`~mgpu.engine.cuda_graph.GRAPH_EXEC_BYTES` per graph for the driver's copies.

        Args:
            sched: the scheduler's limits.
            world_size: ranks of the engine (they share the host's RAM on CPU).
            graph_mode: ``cuda``, ``eager`` (graph-shaped steps on CPU) or None.
        """
        cache = self.cache_config
        cap = sched.max_num_seqs * blocks_for_tokens(sched.max_model_len, cache.block_size)
        if cache.num_blocks_override is not None:
            return cache.num_blocks_override
        tokens = min(sched.max_num_batched_tokens, sched.max_model_len)
        per_block = self.kv_bytes_per_token() * cache.block_size
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            self._profile_forward(tokens)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            non_torch = (total - free) - torch.cuda.memory_allocated(self.device)
            budget = cache.gpu_memory_utilization * total - peak - non_torch
            if graph_mode == "cuda":
                # Every rank profiles (a pipeline stage's profile pairs with its neighbours'), and
                # a stage that will not capture keeps the memory.
                max_blocks = blocks_for_tokens(sched.max_model_len, self.block_size)
                shapes = graph_shapes(sched.max_num_seqs, max_blocks, self.block_size)
                pool = self._profile_decode(shapes[0], sched.max_model_len)
                if uncapturable(self.model) is None:
                    budget -= pool + len(shapes) * GRAPH_EXEC_BYTES
        else:
            process = psutil.Process(os.getpid())
            before = process.memory_info().rss
            self._profile_forward(tokens)
            activations = max(0, process.memory_info().rss - before)
            if cache.rank_memory_bytes is not None:
                share = cache.rank_memory_bytes[self.rank]
                budget = cache.gpu_memory_utilization * share - self.param_bytes() - activations
            else:
                share = psutil.virtual_memory().available / world_size
                budget = cache.gpu_memory_utilization * share - activations
        budget -= _RUNTIME_RESERVE_BYTES
        if graph_mode is not None:
            budget -= per_block  # the scratch block
        gc.collect()
        return max(0, min(cap, int(budget // per_block)))

    def _profile_forward(self, num_tokens: int) -> None:
        blocks = blocks_for_tokens(num_tokens, self.block_size)
        self.allocate_kv_cache(blocks)
        chunk = SeqChunk(-1, [0] * num_tokens, 0, list(range(blocks)), sample=False)
        self._forward(StepInput([chunk]))
        self.allocate_kv_cache(0)

    def _profile_decode(self, shape: tuple[int, int], max_model_len: int) -> int:
        """Activation bytes of a decode step at the largest graph's (batch size, block width):
        every sequence reads the same table of that width, at its last position."""
        batch, width = shape
        self.allocate_kv_cache(width)
        table = list(range(width))
        position = min(width * self.block_size, max_model_len) - 1
        chunks = [SeqChunk(-1, [0], position, table, sample=False) for _ in range(batch)]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self._forward(StepInput(chunks))
        torch.cuda.synchronize(self.device)
        used = torch.cuda.max_memory_allocated(self.device) - base
        self.allocate_kv_cache(0)
        return used

    def allocate_kv_cache(self, num_blocks: int, scratch_block: bool = False) -> None:
        """(Re)allocate every layer's cache: (2, kv_heads, num_blocks, block_size, head_dim).

        Drops any decode graphs (they hold the old cache's addresses).

        Args:
            num_blocks: the engine's blocks.
            scratch_block: add one block past them for the padding rows of graph-shaped steps.
        """
        self.release_decode_graphs()
        self.scratch_block = num_blocks if scratch_block else None
        total = num_blocks + 1 if scratch_block else num_blocks
        for attn in self.attn_layers:
            shape = attn.cache_shape(total, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ---- decode graphs ------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare_decode_graphs(self, sched: SchedulerConfig, mode: str) -> GraphReport:
        """Build the static buffers of graph-shaped decode steps and, on CUDA, capture them.

        Called by the engine on every rank at once, after ``allocate_kv_cache(..., True)`` (see
        :mod:`mgpu.engine.cuda_graph`). A stage that cannot be captured, or whose capture failed,
        keeps the plain path and says why in its report.

        Args:
            sched: the scheduler's limits (the largest batch and context).
            mode: ``cuda`` (capture) or ``eager`` (graph-shaped steps run eagerly: CPU tests).
        """
        if self.scratch_block is None:
            raise RuntimeError("graph-shaped steps need allocate_kv_cache(..., scratch_block=True)")
        self.release_decode_graphs()
        max_blocks = blocks_for_tokens(sched.max_model_len, self.block_size)
        reason = uncapturable(self.model)
        if reason is not None:
            sizes, widths = batch_sizes(sched.max_num_seqs), block_widths(max_blocks)
            return GraphReport(mode, 0, tuple(sizes), tuple(widths), disabled=reason)
        lora = self.lora
        graphs = DecodeGraphs(
            self._run_stage,
            mode,
            max_num_seqs=sched.max_num_seqs,
            max_blocks=max_blocks,
            block_size=self.block_size,
            scratch_block=self.scratch_block,
            max_positions=self.config.max_position_embeddings,
            sliding_window=self.config.sliding_window,
            hidden_size=None if self.is_first else self.config.hidden_size,
            dtype=self.dtype,
            device=self.device,
            lora_width=lora.max_loras * lora.max_rank if lora is not None else None,
        )
        report = graphs.capture()
        if report.error is None:
            self.graphs = graphs
        return report

    def release_decode_graphs(self) -> None:
        """Run every step on the plain path from now on (drops graphs and buffers)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def decode_graph_steps(self) -> dict[tuple[int, int], int]:
        """Graph-shaped steps run so far, per (batch size, block width)."""
        return dict(self.graphs.steps) if self.graphs is not None else {}

    # ---- steps --------------------------------------------------------------------------------

    def _metadata(
        self, chunks: list[SeqChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's input ids (T,), positions (T,) and attention metadata."""
        config = self.config
        return step_tensors(
            chunks,
            self.block_size,
            config.max_position_embeddings,
            config.sliding_window,
            self.device,
        )

    @torch.inference_mode()
    def _forward(self, step: StepInput) -> torch.Tensor | None:
        """Run this stage; returns the last stage's final hidden states (T, h), else None.

        A decode step that fits a graph shape runs graph-shaped (``mgpu.engine.cuda_graph``);
        every other step, and every step without graphs, on the plain path below. Either way the
        step's inputs are built before it waits for the previous stage's hidden states.
        """
        graph_shape = self.graphs.shape(step.chunks) if self.graphs is not None else None
        if graph_shape is not None:
            assert self.graphs is not None
            self.graphs.fill(step.chunks, graph_shape)
            hidden, residual = self._receive(len(step.chunks))
            lora = self.lora.mapping(step) if self.lora is not None else None
            hidden, residual = self.graphs.run(
                graph_shape, len(step.chunks), lora, hidden, residual
            )
        else:
            input_ids, positions, meta = self._metadata(step.chunks)
            hidden, residual = self._receive(input_ids.shape[0])
            lora = self.lora.mapping(step) if self.lora is not None else None
            hidden, residual = self._run_stage(input_ids, positions, meta, hidden, residual, lora)
        if not self.is_last:
            self.finish_sends()
            for x in (hidden.contiguous(), residual.contiguous()):
                self._sends.append((pp_send(x), x))
            return None
        return hidden

    def _receive(self, num_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden, residual), each (T, h), from the previous stage; (None, None) on the first."""
        if self.is_first:
            return None, None
        shape = (num_tokens, self.config.hidden_size)
        return pp_recv(shape, self.dtype, self.device), pp_recv(shape, self.dtype, self.device)

    def _run_stage(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden: torch.Tensor | None,
        residual: torch.Tensor | None,
        lora: LoRAMapping | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stage's model on one step's tensors, in the step's forward context (decode-only
        steps through the compiled model with ``compile_decode``)."""
        compiled = self._decode_model is not None and meta.all_decode
        model = self._decode_model if compiled else self.model
        with set_forward_context(ForwardContext(meta, lora)):
            return model(input_ids, positions, meta, hidden, residual)

    def finish_sends(self) -> None:
        """Wait for the previous step's hand-offs to the next stage (they are usually done)."""
        with TIMER.collective():
            for work, _ in self._sends:
                work.wait()
        self._sends = []

    @torch.inference_mode()
    def execute(self, step: StepInput) -> list[SampleResult] | None:
        """Run one step; the output rank returns a token for every chunk that samples."""
        TIMER.begin_step()
        try:
            if self._slow_s:
                time.sleep(self._slow_s)
            return self._execute(step)
        finally:
            TIMER.end_step()

    def _execute(self, step: StepInput) -> list[SampleResult] | None:
        if self.sampler is not None:
            for seq_id in step.finished_seqs:
                self.sampler.remove(seq_id)
                self._sampled.pop(seq_id, None)
            for seq_id, params in step.new_seqs.items():
                self.sampler.add(seq_id, params)
        self._fill_deferred(step.chunks)
        hidden = self._forward(step)
        if hidden is None:
            return None
        ends, seq_ids, offset = [], [], 0
        for chunk in step.chunks:
            offset += len(chunk.token_ids)
            if chunk.sample:
                ends.append(offset - 1)
                seq_ids.append(chunk.seq_id)
        if not ends:
            return [] if self.is_output_rank else None
        index = torch.tensor(ends, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[index])  # (sampled seqs, vocab) on TP rank 0
        if logits is None or self.sampler is None:
            return None
        results = self.sampler(seq_ids, logits)
        for seq_id, result in zip(seq_ids, results, strict=True):
            self._sampled[seq_id] = result.token_id  # 0 for a failed row: a valid id to feed
        return results

    def _fill_deferred(self, chunks: list[SeqChunk]) -> None:
        """Put the token each looked-ahead chunk feeds in place of its ``DEFERRED_TOKEN``: the one
        the output rank sampled for the sequence in the previous step, broadcast over the TP
        group (the engine schedules such chunks only on single-stage layouts, where the output
        rank is TP rank 0 of the only stage, and every rank runs the steps in order)."""
        deferred = [chunk for chunk in chunks if chunk.is_deferred]
        if not deferred:
            return
        if not (self.is_first and self.is_last):
            raise ValueError("a looked-ahead step needs a single pipeline stage")
        # Only the output rank knows them; the others' zeros are overwritten by the broadcast.
        sampled = self._sampled
        tokens = [sampled.pop(c.seq_id) for c in deferred] if self.sampler else [0] * len(deferred)
        if ps.get_tp_size() > 1:
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
            tokens = tp_broadcast_tokens(ids).tolist()
        for chunk, token in zip(deferred, tokens, strict=True):
            chunk.token_ids = [token]

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor | None:
        """Full-vocabulary logits (T, vocab) at every position of one prompt, on the output rank.

        Used for scoring and perplexity, and by the tests that compare against transformers. The
        engine runs it only while no request is in flight, so it may use any blocks of the cache.
        """
        needed = blocks_for_tokens(len(token_ids), self.block_size)
        total = self.attn_layers[0].num_blocks if self.scratch_block is None else self.scratch_block
        if needed > total:
            raise ValueError(f"prompt of {len(token_ids)} tokens exceeds the KV cache")
        chunk = SeqChunk(-1, token_ids, 0, list(range(needed)), sample=False)
        hidden = self._forward(StepInput([chunk]))
        if hidden is None:
            return None
        logits = self.model.compute_logits(hidden)
        return None if logits is None else logits.cpu()


def step_tensors(
    chunks: list[SeqChunk],
    block_size: int,
    max_positions: int,
    sliding_window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step's input ids (T,), positions (T,) and attention metadata, its chunks flattened.

    Args:
        chunks: the step's sequences and the tokens each feeds.
        block_size: tokens per KV-cache block.
        max_positions: the model's ``max_position_embeddings``.
        sliding_window: the model's window width, for the masks (None: global attention).
        device: where the tensors go.
    """
    bs = block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    decode_idx: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefill_idx: list[list[int]] = []
    prefill_tables: list[list[int]] = []
    prefill_ctx: list[int] = []
    for chunk in chunks:
        start = len(ids)
        n = len(chunk.token_ids)
        ids.extend(chunk.token_ids)
        chunk.check_positions(max_positions)
        pos = range(chunk.start_pos, chunk.start_pos + n)
        positions.extend(pos)
        table = chunk.block_table
        slots.extend(table[p // bs] * bs + p % bs for p in pos)
        if n == 1 and chunk.start_pos > 0:
            decode_idx.append(start)
            decode_tables.append(table)
            decode_lens.append(chunk.start_pos + 1)
        else:
            prefill_idx.append(list(range(start, start + n)))
            prefill_tables.append(table[: blocks_for_tokens(pos.stop, bs)])
            prefill_ctx.append(pos.stop)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
    if decode_idx:
        width = max(len(t) for t in decode_tables)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]
        meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=device)
        meta.decode_num_keys = width * bs
        meta.decode_token_idx = torch.tensor(decode_idx, dtype=torch.long, device=device)
        meta.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=device)
        meta.all_decode = not prefill_idx
    if prefill_idx:
        meta.prefills = _prefill_batches(prefill_idx, prefill_tables, prefill_ctx, device)
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    position_ids = torch.tensor(positions, dtype=torch.long, device=device)
    meta = window_metadata(meta, position_ids, sliding_window)
    return input_ids, position_ids, meta


def _prefill_batches(
    token_idx: list[list[int]],
    tables: list[list[int]],
    contexts: list[int],
    device: torch.device,
) -> list[PrefillBatch]:
    """The step's prefilling spans in batches of one attention call each.

    Spans are taken longest context first; a span joins the current batch while padding the batch
    to its longest span keeps the attention work within twice the real work, so a long prompt
    next to short ones does not multiply the short ones' cost.

    Args:
        token_idx: each span's flat token indices.
        tables: each span's blocks up to its last new token.
        contexts: each span's context length after this step (cached tokens + new ones).
        device: where the tensors go.
    """
    order = sorted(range(len(token_idx)), key=lambda i: -contexts[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group is not None:
            members = [*group, i]
            padded = len(members) * max(len(token_idx[j]) for j in members) * contexts[group[0]]
            real = sum(len(token_idx[j]) * contexts[j] for j in members)
            if padded <= 2 * real:
                group.append(i)
                continue
        groups.append([i])
    return [
        _prefill_batch(
            [token_idx[i] for i in g], [tables[i] for i in g], [contexts[i] for i in g], device
        )
        for g in groups
    ]


def _prefill_batch(
    token_idx: list[list[int]],
    tables: list[list[int]],
    contexts: list[int],
    device: torch.device,
) -> PrefillBatch:
    """Spans padded to the longest, for one attention call (arguments as ``_prefill_batches``)."""
    max_n = max(len(t) for t in token_idx)
    padded = [t + [t[0]] * (max_n - len(t)) for t in token_idx]
    rows = [s * max_n + j for s, t in enumerate(token_idx) for j in range(len(t))]
    flat = [i for t in token_idx for i in t]
    batch = PrefillBatch(
        token_idx=torch.tensor(padded, dtype=torch.long, device=device),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        token_flat=torch.tensor(flat, dtype=torch.long, device=device),
        num_keys=max_n,
    )
    if any(c > len(t) for c, t in zip(contexts, token_idx, strict=True)):
        width = max(len(t) for t in tables)
        table_rows = [t + [0] * (width - len(t)) for t in tables]
        batch.block_tables = torch.tensor(table_rows, dtype=torch.long, device=device)
        batch.from_cache, batch.num_keys = True, max(contexts)
    return batch


def _test_slow_seconds(rank: int) -> float:
    """Seconds of :data:`SLOW_RANK_ENV` for ``rank`` (0 when unset or for another rank)."""
    value = os.environ.get(SLOW_RANK_ENV, "")
    if not value:
        return 0.0
    slow_rank, _, seconds = value.partition(":")
    return float(seconds) if int(slow_rank) == rank else 0.0
