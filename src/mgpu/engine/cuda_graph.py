"""Decode steps on static buffers, replayed as CUDA graphs (issue 13; vLLM's and nano-vllm's idea).

A decode step launches a few kernels per layer for one token per sequence: on a GPU the launches,
not the arithmetic, bound small and medium batches. A CUDA graph records one forward pass of the
model at a fixed shape and replays it with one launch. Its tensors keep the addresses they had at
capture, so a graph-shaped step writes its inputs into static buffers and reads its outputs from
static tensors::

    step of n decoding sequences, longest context c
      pad to the bucket (b, w):  b = smallest batch size >= n,  w = smallest block width >= c / bs
      host -> buffers:           ids, positions, slots (n real + b - n padding rows), block tables
                                 (b, w) padded with the scratch block; LoRA mask rows; on a later
                                 pipeline stage the received hidden and residual rows
      replay graph (b, w)        or, on CPU under the test switch, the same forward run eagerly
      outputs[:n]                the real rows; the padding rows are dropped

What is captured: the model's forward pass of one pipeline stage, tensor-parallel all-reduces
included (NCCL captures collectives; every TP rank captures the same graphs in the same order
and replays the same one at each step, which NCCL requires). Not captured: the pipeline hand-off
(received into the buffers before a replay, sent from copies of the outputs after it; the stages
pad independently, so only real rows travel), the LM head and the sampler (outside the forward).

Padding rows are sequences that do not exist: token 0 at position 0, writing its key and value into
the *scratch block*, one block the runner allocates beyond the engine's ``num_blocks`` that no
sequence owns, and reading only that block. Real rows pad their tables with it too; their mask hides
every key past their position, so what the scratch block holds never reaches them.

Block width. The attention of a decode step gathers every block of the batch's tables, padded to
the longest one (``PagedAttention.gather``), so the gathered width is part of the shape. Capturing
one graph per batch size at the widest table (``max_model_len / block_size``) would make every
step read ``max_model_len`` keys per sequence: at a context of a few hundred tokens that multiplies
the KV-cache reads many times over, and decode is bound by memory reads. Widths are therefore
bucketed too, in powers of two up to the widest table: a step reads at most twice the blocks of its
longest sequence (as the eager path does with its exact width), and the grid grows with the
logarithm of the context length. Every (batch size, width) pair is captured at start-up, largest
first, so smaller graphs reuse the memory of larger ones from one shared pool; capturing lazily in
the middle of serving would stall a step and could leave the TP ranks disagreeing about a graph
whose capture failed on one of them.

Batch sizes: 1, 2, 4, 8, then multiples of 8 up to 64, of 16 up to 128, of 32 up to 256 (a step of
a quarter of the power of two below), and ``max_num_seqs`` itself. A decode step reads every weight
once whatever its batch, so a padding row costs only its share of the matmuls and its attention
over the scratch block; above 32 rows the padding stays under a quarter of the batch, while the
number of sizes grows with the logarithm of ``max_num_seqs`` (19 for 256, against 35 with a flat
step of 8), which bounds the graphs held and the start-up capture time.

Gathered keys. The gather copies a step's blocks, so a graph's memory pool keeps ``b * w *
block_size`` keys and values of one layer (plus its scores) for good: at 64 sequences of 32k
tokens that is 8 GiB for a Llama-3-8B (4 KiB per key). Shapes gathering more than
:data:`MAX_GRAPH_KEYS` keys are not captured and run eagerly: such a step moves over 16 GiB of
keys and values across the layers, which takes longer than the kernel launches a graph saves, and
the pool stays near 0.5 GiB for such a model (the start-up profile measures it and leaves it out
of the KV budget).

Nothing in the captured region syncs with the host: shapes come from the bucket, the masks are
built inside the graph from the position buffer (``window_metadata``), and the runner checks
positions on the host before it fills the buffers. Steps that cannot be replayed run eagerly:
steps with a prefill (their shapes change with every prompt), batches over the largest size,
shapes over :data:`MAX_GRAPH_KEYS`, and every step of a stage with MoE layers (their routing
sizes each expert's matmul by the number of tokens routed to it, read back with ``.tolist()``).
The rank timer (``monitor.timing``) brackets collectives with CUDA events only inside steps;
capture happens at start-up, outside any step, so no event is recorded into a graph, and a
replayed step is timed as a whole (its collectives are not split out of its compute time).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mgpu.engine.forward_context import LoRAMapping
from mgpu.engine.messages import SeqChunk
from mgpu.layers.attention import AttentionMetadata, window_metadata
from mgpu.layers.moe import FusedMoE

#: Test-only setting: ``1`` makes an engine on CPU run its decode steps graph-shaped (padded into
#: the static buffers, eagerly, since CPUs have no graphs), so the tests check the padding, the
#: scratch block, the buckets and the slicing against the plain path.
GRAPH_SHAPED_ENV = "MGPU_TEST_GRAPH_SHAPED"

#: Allowance per captured graph for what the CUDA driver keeps of it outside torch's allocator
#: (its instantiated nodes). An estimate, not yet measured on hardware; the start-up report gives
#: what capture took.
GRAPH_EXEC_BYTES = 2 * 2**20

#: Most keys (batch size x block width x block size) a captured shape gathers per layer (module
#: docstring: larger steps are bound by their KV-cache reads, not by kernel launches).
MAX_GRAPH_KEYS = 2**17

#: ``forward(input_ids, positions, meta, hidden, residual, lora) -> (hidden, residual)`` of one
#: pipeline stage, the forward context set around it.
StageForward = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        AttentionMetadata,
        torch.Tensor | None,
        torch.Tensor | None,
        LoRAMapping | None,
    ],
    tuple[torch.Tensor, torch.Tensor | None],
]


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The padded batch sizes of decode steps, ascending, the last ``max_num_seqs`` (module
    docstring: 1, 2, 4, 8, then steps of a quarter of the power of two below, at least 8).

    Args:
        max_num_seqs: most sequences in a step.
    """
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    size = 8
    while size < max_num_seqs:
        sizes.append(size)
        size += max(8, (1 << (size.bit_length() - 1)) // 4)
    return [*sizes, max_num_seqs]


def block_widths(max_blocks: int) -> list[int]:
    """The padded block-table widths of decode steps: powers of two below ``max_blocks``, then
    ``max_blocks`` (the table of a sequence at ``max_model_len``).

    Args:
        max_blocks: blocks of the longest table.
    """
    widths = []
    width = 1
    while width < max_blocks:
        widths.append(width)
        width *= 2
    return [*widths, max_blocks]


def graph_shapes(max_num_seqs: int, max_blocks: int, block_size: int) -> list[tuple[int, int]]:
    """Every (batch size, block width) served graph-shaped, most gathered keys first (capture
    order: later graphs reuse the pool of earlier, larger ones).

    Args:
        max_num_seqs: most sequences in a step.
        max_blocks: blocks of a table at ``max_model_len``.
        block_size: tokens per block.
    """
    shapes = [
        (b, w)
        for b in batch_sizes(max_num_seqs)
        for w in block_widths(max_blocks)
        if b * w * block_size <= MAX_GRAPH_KEYS or b * w == 1
    ]
    return sorted(shapes, key=lambda s: (s[0] * s[1], s[0]), reverse=True)


def uncapturable(model: nn.Module) -> str | None:
    """Why this stage's forward cannot be captured (None: it can).

    Args:
        model: the stage.
    """
    if any(isinstance(m, FusedMoE) for m in model.modules()):
        return (
            "MoE layers size each expert's matmul by the tokens routed to it, read back to the "
            "host (a data-dependent shape)"
        )
    return None


@dataclass(frozen=True)
class GraphReport:
    """What one rank did at start-up (the engine logs one line from all of them).

    Args:
        mode: ``cuda`` (captured graphs) or ``eager`` (graph-shaped steps run eagerly, CPU tests).
        num_graphs: (batch size, width) shapes served graph-shaped (those of ``batch_sizes`` x
            ``widths`` within :data:`MAX_GRAPH_KEYS`); 0 when disabled or failed.
        batch_sizes: the padded batch sizes.
        widths: the padded block-table widths.
        seconds: capture time.
        memory_bytes: device memory capture took (the shared pool and the graphs), CUDA only.
        disabled: why this rank runs every decode step eagerly.
        error: the capture error that turned graphs off (one line).
    """

    mode: str
    num_graphs: int
    batch_sizes: tuple[int, ...]
    widths: tuple[int, ...]
    seconds: float = 0.0
    memory_bytes: int = 0
    disabled: str | None = None
    error: str | None = None


class DecodeGraphs:
    """Static buffers of graph-shaped decode steps, and their captured graphs on CUDA.

    Args:
        forward: the stage's forward (``StageForward``).
        mode: ``cuda`` to capture and replay graphs; ``eager`` to run graph-shaped steps eagerly.
        max_num_seqs: most sequences in a step.
        max_blocks: blocks of a table at ``max_model_len``.
        block_size: tokens per block.
        scratch_block: the block padding rows write to and read (owned by no sequence).
        max_positions: the model's ``max_position_embeddings``.
        sliding_window: the model's window width (None: global attention).
        hidden_size: width of the hidden states a later pipeline stage receives; None on the
            first stage.
        dtype: activations dtype.
        device: this rank's device.
        lora_width: ``max_loras * max_lora_rank`` when LoRA slots are attached, else None.
    """

    def __init__(
        self,
        forward: StageForward,
        mode: str,
        *,
        max_num_seqs: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        max_positions: int,
        sliding_window: int | None,
        hidden_size: int | None,
        dtype: torch.dtype,
        device: torch.device,
        lora_width: int | None,
    ):
        if mode not in ("cuda", "eager"):
            raise ValueError(f"graph mode must be cuda or eager, got {mode!r}")
        self.forward, self.mode, self.device = forward, mode, device
        self.block_size, self.scratch_block = block_size, scratch_block
        self.max_positions, self.sliding_window = max_positions, sliding_window
        self.batch_sizes = batch_sizes(max_num_seqs)
        self.widths = block_widths(max_blocks)
        #: The shapes served graph-shaped, most gathered keys first.
        self.shapes = graph_shapes(max_num_seqs, max_blocks, block_size)
        self._shape_set = set(self.shapes)
        b = self.batch_sizes[-1]
        # One int64 buffer, so one host-to-device copy fills a step's inputs. Shape (b, w) reads it
        # as ids [0, b), positions [b, 2b), slots [2b, 3b), tables [3b, 3b + b w) as (b, w).
        size = max(3 * s + s * w for s, w in self.shapes)
        self._ints = torch.zeros(size, dtype=torch.long, device=device)
        self._token_idx = torch.arange(b, device=device)  # (b,) decode row i is token i
        self._hidden = self._residual = None
        if hidden_size is not None:
            self._hidden = torch.zeros(b, hidden_size, dtype=dtype, device=device)  # (b, h)
            self._residual = torch.zeros(b, hidden_size, dtype=dtype, device=device)  # (b, h)
        self._lora_slots = self._lora_mask = None
        if lora_width is not None:
            self._lora_slots = torch.full((b,), -1, dtype=torch.long, device=device)  # (b,)
            self._lora_mask = torch.zeros(b, lora_width, dtype=dtype, device=device)  # (b, S*R)
        # (b, w) -> (graph, its static (hidden, residual) outputs); CUDA only.
        self._graphs: dict[tuple[int, int], tuple[Any, tuple[torch.Tensor, Any]]] = {}
        self._pool: Any = None
        #: Steps run per (batch size, width).
        self.steps: Counter[tuple[int, int]] = Counter()

    # ---- per step -----------------------------------------------------------------------------

    def shape(self, chunks: list[SeqChunk]) -> tuple[int, int] | None:
        """The (batch size, width) a step runs at; None when it runs on the plain path.

        Args:
            chunks: the step's sequences.
        """
        n = len(chunks)
        if n > self.batch_sizes[-1]:
            return None
        last = 0
        for chunk in chunks:
            if len(chunk.token_ids) != 1 or chunk.start_pos == 0:  # a prefill
                return None
            last = max(last, chunk.start_pos)
        i = bisect.bisect_left(self.widths, last // self.block_size + 1)
        if i == len(self.widths):
            return None
        shape = (self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)], self.widths[i])
        if shape not in self._shape_set or (self.mode == "cuda" and shape not in self._graphs):
            return None
        return shape

    def fill(self, chunks: list[SeqChunk], shape: tuple[int, int]) -> None:
        """Write a step's ids, positions, slots and tables into the buffers (one copy), padded to
        ``shape``: padding rows hold token 0 at position 0 in the scratch block, and each real
        row's table is its blocks up to its position, then the scratch block.

        Args:
            chunks: the step's n decoding sequences.
            shape: (batch size b, width w), from :meth:`shape`.
        """
        b, w = shape
        bs, scratch = self.block_size, self.scratch_block
        pad = b - len(chunks)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[int] = []
        for chunk in chunks:
            chunk.check_positions(self.max_positions)
            pos = chunk.start_pos
            row = chunk.block_table[: pos // bs + 1]
            ids.append(chunk.token_ids[0])
            positions.append(pos)
            slots.append(row[-1] * bs + pos % bs)
            tables += row
            tables += [scratch] * (w - len(row))
        values = [
            *ids,
            *[0] * pad,
            *positions,
            *[0] * pad,
            *slots,
            *[scratch * bs] * pad,
            *tables,
            *[scratch] * (pad * w),
        ]
        self._ints[: len(values)].copy_(torch.tensor(values, dtype=torch.long))

    def run(
        self,
        shape: tuple[int, int],
        n: int,
        lora: LoRAMapping | None,
        hidden: torch.Tensor | None,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the step :meth:`fill` wrote at ``shape``; returns its n real rows.

        Args:
            shape: (batch size b, width w).
            n: the step's sequences.
            lora: the LoRA mapping of its n tokens (None: no token uses an adapter).
            hidden, residual: (n, h) from the previous stage (later stages only).

        Returns:
            (hidden, residual), each (n, h); residual None on the last stage. On a stage that
            hands on, tensors of their own (a replay overwrites the static outputs).
        """
        b, _ = shape
        if self._hidden is not None and self._residual is not None:
            assert hidden is not None and residual is not None
            self._hidden[:n].copy_(hidden)
            self._residual[:n].copy_(residual)
        if self._lora_mask is not None and self._lora_slots is not None:
            if lora is None:  # every row on the base model: all-zero mask rows
                self._lora_mask[:b].zero_()
                self._lora_slots[:b].fill_(-1)
            else:
                self._lora_mask[:n].copy_(lora.mask)
                self._lora_mask[n:b].zero_()
                self._lora_slots[:n].copy_(lora.token_slots)
                self._lora_slots[n:b].fill_(-1)
        self.steps[shape] += 1
        if self.mode == "eager":
            out_hidden, out_residual = self._stage(*shape)
            return out_hidden[:n], None if out_residual is None else out_residual[:n]
        graph, (out_hidden, out_residual) = self._graphs[shape]
        graph.replay()
        if out_residual is None:  # last stage: the runner reads it before the next replay
            return out_hidden[:n], None
        return out_hidden[:n].clone(), out_residual[:n].clone()

    def _stage(self, b: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's forward over the buffers at (b, w): what a graph captures."""
        ints = self._ints
        ids, positions, slots = ints[:b], ints[b : 2 * b], ints[2 * b : 3 * b]
        meta = AttentionMetadata(
            slot_mapping=slots,
            decode_token_idx=self._token_idx[:b],
            decode_block_tables=ints[3 * b : 3 * b + b * w].view(b, w),
            decode_num_keys=w * self.block_size,
            all_decode=True,
        )
        meta = window_metadata(meta, positions, self.sliding_window)  # (b, 1, w bs) bias, in-graph
        lora = None
        if self._lora_mask is not None and self._lora_slots is not None:
            lora = LoRAMapping(self._lora_slots[:b], self._lora_mask[:b])
        hidden = self._hidden[:b] if self._hidden is not None else None
        residual = self._residual[:b] if self._residual is not None else None
        return self.forward(ids, positions, meta, hidden, residual, lora)

    # ---- start-up -----------------------------------------------------------------------------

    def capture(self) -> GraphReport:
        """Capture every (batch size, width), largest first, into one shared pool (CUDA).

        Each shape is first run eagerly on the padding-only inputs (a warm-up: it runs the
        collectives for real, pairing with the other TP ranks' warm-ups), then captured. A
        capture error ends capturing on this rank, which still runs the remaining warm-ups so the
        other ranks' collectives find their peer; the rank then drops its graphs and reports the
        error, and the engine turns graphs off on every rank.
        """
        shapes = self.shapes
        report = GraphReport(self.mode, len(shapes), tuple(self.batch_sizes), tuple(self.widths))
        if self.mode == "eager":
            return report
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        error = None
        for b, w in shapes:
            self.fill([], (b, w))  # every row padding: token 0 at position 0 in the scratch block
            self._stage(b, w)
            if error is not None:
                continue
            try:
                graph = torch.cuda.CUDAGraph()
                # thread_local: the NCCL watchdog thread's event queries must not end the capture.
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    outputs = self._stage(b, w)
            except Exception as exc:  # any capture failure falls back to eager steps
                first_line = f"{type(exc).__name__}: {exc}".splitlines()[0]
                error = f"capturing batch {b} x {w} blocks: {first_line}"
                continue
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[(b, w)] = (graph, outputs)
        torch.cuda.synchronize(self.device)
        if error is not None:
            self.release()
            return GraphReport(self.mode, 0, report.batch_sizes, report.widths, error=error)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        return GraphReport(
            self.mode,
            len(self._graphs),
            report.batch_sizes,
            report.widths,
            seconds=time.perf_counter() - start,
            memory_bytes=max(0, used),
        )

    def release(self) -> None:
        """Drop the graphs and their pool."""
        self._graphs.clear()
        self._pool = None
        if self.mode == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
