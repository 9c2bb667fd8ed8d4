"""Graph-shaped decode steps in one process: the buckets, the padded buffers, what falls back.

The end-to-end comparison with the plain path (TP, PP, LoRA) is
``tests/distributed/test_graph_shaped_steps.py``; the capture itself, ``tests/gpu``.
"""

from __future__ import annotations

import bisect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgpu.engine.cuda_graph import (
    MAX_GRAPH_KEYS,
    DecodeGraphs,
    batch_sizes,
    block_widths,
    graph_shapes,
    uncapturable,
)
from mgpu.engine.forward_context import LoRAMapping
from mgpu.engine.messages import SeqChunk
from mgpu.layers.attention import AttentionMetadata
from mgpu.layers.moe import FusedMoE

BS = 4  # tokens per block
SCRATCH = 50  # the scratch block's id
HIDDEN = 3


def test_batch_sizes() -> None:
    assert batch_sizes(1) == [1]
    assert batch_sizes(5) == [1, 2, 4, 5]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    sizes = batch_sizes(256)
    assert len(sizes) == 19 and sizes[-5:] == [128, 160, 192, 224, 256]
    for n in range(1, 257):  # beyond 32 rows, padding stays under a quarter of the bucket
        padded = sizes[bisect.bisect_left(sizes, n)]
        assert padded >= n and (padded - n <= 7 or padded - n < padded / 4), n
    assert batch_sizes(100)[-2:] == [96, 100]


def test_block_widths() -> None:
    assert block_widths(1) == [1]
    assert block_widths(32) == [1, 2, 4, 8, 16, 32]
    assert block_widths(20) == [1, 2, 4, 8, 16, 20]


def test_graph_shapes_bound_the_gathered_keys() -> None:
    shapes = graph_shapes(64, 8192, 16)  # 128k tokens of context
    assert all(b * w * 16 <= MAX_GRAPH_KEYS for b, w in shapes)
    assert (1, 8192) in shapes and (64, 128) in shapes and (64, 256) not in shapes
    keys = [b * w for b, w in shapes]
    assert keys == sorted(keys, reverse=True)  # captured largest first
    assert len(graph_shapes(64, 32, 16)) == 11 * 6  # short contexts: the whole grid


class Recorder:
    """A stage forward that keeps its inputs and returns rows it can recognise."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden: torch.Tensor | None,
        residual: torch.Tensor | None,
        lora: LoRAMapping | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls.append((ids.clone(), positions.clone(), meta, hidden, residual, lora))
        out = ids.float().unsqueeze(1).expand(-1, HIDDEN) + (0 if hidden is None else hidden)
        return out, None if residual is None else residual * 2


def _graphs(forward: Recorder, **kwargs: object) -> DecodeGraphs:
    settings: dict = dict(
        max_num_seqs=8,
        max_blocks=8,
        block_size=BS,
        scratch_block=SCRATCH,
        max_positions=64,
        sliding_window=None,
        hidden_size=None,
        dtype=torch.float32,
        device=torch.device("cpu"),
        lora_width=None,
    )
    settings.update(kwargs)
    return DecodeGraphs(forward, "eager", **settings)


def _decode(seq: int, token: int, pos: int, table: list[int], lora_id: int = 0) -> SeqChunk:
    return SeqChunk(seq, [token], pos, table, sample=True, lora_id=lora_id)


def test_shape_picks_the_bucket_or_the_plain_path() -> None:
    graphs = _graphs(Recorder())
    chunks = [_decode(0, 7, 9, [3, 4, 5]), _decode(1, 8, 2, [6]), _decode(2, 9, 5, [1, 2])]
    assert graphs.shape(chunks) == (4, 4)  # 3 rows -> 4; position 9 is in block 3 -> width 4
    assert graphs.shape(chunks[1:2]) == (1, 1)
    assert graphs.shape([_decode(0, 7, 31, list(range(8)))]) == (1, 8)
    prefill = SeqChunk(3, [1, 2, 3], 0, [9], sample=True)
    assert graphs.shape([*chunks, prefill]) is None  # a step with a prefill
    assert graphs.shape([SeqChunk(3, [1], 0, [9], sample=True)]) is None  # a 1-token prompt
    many = [_decode(i, 1, 1, [i]) for i in range(9)]
    assert graphs.shape(many) is None  # more rows than the largest bucket


def test_padding_rows_use_only_the_scratch_block() -> None:
    forward = Recorder()
    graphs = _graphs(forward)
    chunks = [_decode(0, 7, 9, [3, 4, 5, 11]), _decode(1, 8, 2, [6]), _decode(2, 9, 5, [1, 2])]
    shape = graphs.shape(chunks)
    assert shape == (4, 4)
    graphs.fill(chunks, shape)
    hidden, residual = graphs.run(shape, 3, None, None, None)
    ids, positions, meta, _, _, lora = forward.calls[-1]
    assert ids.tolist() == [7, 8, 9, 0]
    assert positions.tolist() == [9, 2, 5, 0]
    assert meta.slot_mapping.tolist() == [5 * BS + 1, 6 * BS + 2, 2 * BS + 1, SCRATCH * BS]
    assert meta.decode_block_tables.tolist() == [  # blocks up to the position, then scratch
        [3, 4, 5, SCRATCH],
        [6, SCRATCH, SCRATCH, SCRATCH],
        [1, 2, SCRATCH, SCRATCH],
        [SCRATCH] * 4,
    ]
    assert meta.decode_token_idx.tolist() == [0, 1, 2, 3] and meta.all_decode
    visible = meta.decode_bias[:, 0] == 0  # (4, 16) keys each row sees
    assert visible.sum(1).tolist() == [10, 3, 6, 1]  # up to its position; padding: key 0 only
    assert lora is None
    assert hidden.shape == (3, HIDDEN) and hidden[:, 0].tolist() == [7, 8, 9]
    assert residual is None
    assert graphs.steps == {(4, 4): 1}
    # A smaller step at a smaller shape rewrites the front of the same buffers.
    graphs.fill(chunks[1:2], (1, 1))
    graphs.run((1, 1), 1, None, None, None)
    ids, _, meta, _, _, _ = forward.calls[-1]
    assert ids.tolist() == [8] and meta.decode_block_tables.tolist() == [[6]]


def test_positions_beyond_the_model_are_refused() -> None:
    graphs = _graphs(Recorder(), max_positions=8)
    with pytest.raises(ValueError, match="beyond the model's 8 positions"):
        graphs.fill([_decode(0, 1, 8, [0, 1, 2])], (1, 4))


def test_lora_rows_and_received_hidden_states_are_padded() -> None:
    forward = Recorder()
    graphs = _graphs(forward, hidden_size=HIDDEN, lora_width=2)
    chunks = [_decode(0, 1, 4, [0, 1], lora_id=1), _decode(1, 2, 4, [2, 3])]
    shape = graphs.shape(chunks)
    assert shape == (2, 2)
    chunks.append(_decode(2, 3, 4, [4, 5]))
    shape = graphs.shape(chunks)
    assert shape == (4, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mapping = LoRAMapping(torch.tensor([0, -1, -1]), mask)
    received = torch.arange(9.0).view(3, HIDDEN)
    graphs.fill(chunks, shape)
    hidden, residual = graphs.run(shape, 3, mapping, received, received + 1)
    _, _, _, in_hidden, in_residual, lora = forward.calls[-1]
    assert lora is not None
    assert lora.mask.tolist() == [[1, 0], [0, 0], [0, 0], [0, 0]]  # the padding row: base model
    assert lora.token_slots.tolist() == [0, -1, -1, -1]
    assert torch.equal(in_hidden[:3], received) and torch.equal(in_residual[:3], received + 1)
    assert torch.equal(hidden, received + torch.tensor([1.0, 2, 3]).unsqueeze(1))
    assert residual is not None and torch.equal(residual, (received + 1) * 2)
    # A step without adapters zeroes the mask rows the previous step set.
    graphs.fill(chunks, shape)
    graphs.run(shape, 3, None, received, received)
    lora = forward.calls[-1][5]
    assert lora is not None and not lora.mask.any() and (lora.token_slots == -1).all()


def test_moe_layers_are_not_captured() -> None:
    with torch.device("meta"):
        moe = nn.Sequential(nn.Linear(8, 8), FusedMoE(8, 16, 4, 2, True, F.silu))
    reason = uncapturable(moe)
    assert reason is not None and "MoE" in reason
    assert uncapturable(nn.Sequential(nn.Linear(8, 8))) is None
