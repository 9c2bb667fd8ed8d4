"""The LoRA delta of one parallel linear, for every adapter of a mixed batch at once.

A :class:`LoRALayer` hangs on a parallel linear (``layer.lora``, see ``layers.linear``) and holds
the stacked A and B weights of ``max_loras`` slots, each zero-padded to ``max_lora_rank`` (R) and
with the adapter's scaling folded into B. With ``S = max_loras`` and the fused outputs (parts) of
the linear (3 for QKV, 2 for gate/up, else 1)::

    lora_a  (parts * S * R, in_local)     rows  [p, s, k]  = A of part p of the adapter in slot s
    lora_b  (out_local, S * R)            rows of part p   = its B (this rank's rows), slot columns

    h     = x @ lora_a^T                  (T, parts, S * R)   one matmul for all slots
    h    *= mask                          (T, 1, S * R)       a token keeps its own slot's columns
    delta = [h_p @ lora_b_p^T]_p          (T, out_local)      one matmul per fused part

The mask comes from the step's forward context (:class:`~mgpu.engine.forward_context.LoRAMapping`),
so tokens of different adapters and of the base model (all-zero mask row) share the two matmuls:
no loop over sequences or adapters. The extra work is ``S * R`` columns beside the layer's own.

Tensor parallelism shards A and B like the layer they wrap::

    column-parallel (qkv, gate_up):  A replicated (R, in);       B rows of this rank's outputs
    row-parallel (o, down):          A columns of this rank's x;  B replicated (out, R)

A row-parallel delta is a partial sum like the layer's own output: ``layers.linear`` adds it before
the layer's all-reduce, so one all-reduce covers both.
"""

from __future__ import annotations

import torch
from torch import nn

from mgpu.engine.forward_context import get_forward_context
from mgpu.layers.linear import LinearBase, RowParallelLinear


class LoRALayer(nn.Module):
    """Stacked LoRA weights of every slot for one parallel linear.

    Args:
        base: the linear it wraps (its TP geometry decides the shards).
        max_loras: slots (adapters one batch may use).
        max_rank: rank R of every slot.
        dtype: the activations' dtype.
        device: where the slots live (the layer's device).
    """

    def __init__(
        self,
        base: LinearBase,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.is_row_parallel = isinstance(base, RowParallelLinear)
        self.num_parts = len(base.output_sizes)
        self.max_loras, self.max_rank = max_loras, max_rank
        width = max_loras * max_rank
        a_shape = (self.num_parts * width, base.local_input)
        b_shape = (sum(base.local_sizes), width)
        self.register_buffer("lora_a", torch.zeros(a_shape, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(b_shape, dtype=dtype, device=device))
        #: (offset, rows) of each fused part in the local output.
        self.parts = [(sum(base.local_sizes[:p]), n) for p, n in enumerate(base.local_sizes)]

    def set_slot(
        self,
        slot: int,
        weights: list[tuple[torch.Tensor, torch.Tensor] | None],
        scaling: float,
    ) -> None:
        """Put one adapter's shards into ``slot`` (parts it does not target are zeroed).

        Args:
            slot: 0 .. max_loras - 1.
            weights: per fused part, (A shard (r, in_local), B shard (rows, r)) or None.
            scaling: the adapter's ``lora_alpha / r``, folded into B.
        """
        r0, r1 = slot * self.max_rank, (slot + 1) * self.max_rank
        width = self.max_loras * self.max_rank
        with torch.no_grad():
            for p, (offset, rows) in enumerate(self.parts):
                a_rows = slice(p * width + r0, p * width + r1)
                self.lora_a[a_rows] = 0
                self.lora_b[offset : offset + rows, r0:r1] = 0
                pair = weights[p]
                if pair is None:
                    continue
                a, b = pair
                rank = a.shape[0]
                self.lora_a[p * width + r0 : p * width + r0 + rank] = a.to(self.lora_a.dtype)
                scaled = (b.float() * scaling).to(self.lora_b.dtype)
                self.lora_b[offset : offset + rows, r0 : r0 + rank] = scaled

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus each token's LoRA delta (``y`` unchanged when no token uses an adapter).

        Args:
            x: (T, in_local) the layer's input.
            y: (T, out_local) the layer's output (a partial sum for a row-parallel layer).
        """
        context = get_forward_context()
        if context is None or context.lora is None:
            return y
        mask = context.lora.mask  # (T, S * R)
        t = x.shape[0]
        h = (x @ self.lora_a.T).view(t, self.num_parts, -1) * mask[:, None, :]  # (T, parts, S*R)
        if self.num_parts == 1:
            return y + h[:, 0] @ self.lora_b.T  # (T, out_local)
        deltas = [
            h[:, p] @ self.lora_b[offset : offset + rows].T  # (T, rows)
            for p, (offset, rows) in enumerate(self.parts)
        ]
        return y + torch.cat(deltas, dim=1)  # (T, out_local)
