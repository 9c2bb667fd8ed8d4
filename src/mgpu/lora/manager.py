"""A rank's LoRA adapters: their shards in host memory, ``max_loras`` device slots, the mapping.

The engine validated every adapter before the workers started
(:func:`~mgpu.lora.adapter.read_adapter`); here each rank reads only its shard of each tensor (lazy
safetensors slices) and keeps it in host memory. The device holds ``max_loras`` slots per wrapped
linear (:class:`~mgpu.lora.layers.LoRALayer`); every step message says which adapter sits in which
slot (the engine's choice, see :class:`~mgpu.lora.slots.SlotTable`), and a slot whose adapter
changed is refilled from the host copy before the forward pass. A rank runs its steps in order, so
a refill never races a step in flight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from safetensors import safe_open
from torch import nn

from mgpu.engine.forward_context import LoRAMapping
from mgpu.engine.messages import StepInput
from mgpu.layers.linear import LazyTensor, LinearBase, RowParallelLinear
from mgpu.lora.adapter import WEIGHTS_FILE, AdapterInfo, LoRAError, lora_targets
from mgpu.lora.layers import LoRALayer

#: Per fused part of a linear: this rank's (A, B) shards, or None where the adapter has none.
Shards = list[tuple[torch.Tensor, torch.Tensor] | None]


class LoRAManager:
    """Loads this rank's adapter shards, attaches the LoRA layers, fills slots, builds mappings.

    Args:
        model: this rank's pipeline stage (a :class:`~mgpu.models.base.CausalLM`).
        adapters: the validated adapters; adapter id ``i + 1`` is ``adapters[i]``.
        max_loras: device slots.
        max_rank: rank of every slot.
        dtype: activations dtype.
        device: this rank's device.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Sequence[AdapterInfo],
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.max_loras, self.max_rank, self.device = max_loras, max_rank, device
        targets = lora_targets(type(model), model.config)
        modules = dict(model.named_modules())
        self.layers: dict[str, LoRALayer] = {}
        self.host: dict[int, tuple[dict[str, Shards], float]] = {}
        for adapter_id, info in enumerate(adapters, 1):
            shards: dict[str, Shards] = {}
            with safe_open(str(info.path / WEIGHTS_FILE), framework="pt") as f:
                for hf_module, (key_a, key_b) in info.tensors.items():
                    global_name, part, _, _ = targets[hf_module]
                    local = _stage_name(model, global_name)
                    if local is None:
                        continue  # a layer of another pipeline stage
                    base = modules[local]
                    assert isinstance(base, LinearBase)
                    if local not in self.layers:
                        self.layers[local] = LoRALayer(base, max_loras, max_rank, dtype, device)
                        base.lora = self.layers[local]
                    pair = shard_pair(base, part, f.get_slice(key_a), f.get_slice(key_b))
                    shards.setdefault(local, [None] * len(base.output_sizes))[part] = pair
            self.host[adapter_id] = (shards, info.scaling)
        #: Adapter id in each slot (0: empty).
        self.slots = [0] * max_loras
        width = max_loras * max_rank
        table = torch.zeros(max_loras + 1, width, dtype=dtype, device=device)
        for s in range(max_loras):
            table[s + 1, s * max_rank : (s + 1) * max_rank] = 1
        #: (max_loras + 1, S * R): row 0 the base model's zeros, row s + 1 slot s's columns.
        self._mask_table = table

    def slot_bytes(self) -> int:
        """Device bytes of the slots of every wrapped linear."""
        return sum(
            b.numel() * b.element_size() for layer in self.layers.values() for b in layer.buffers()
        )

    def activate(self, lora_slots: Sequence[int]) -> None:
        """Make the slots hold the adapters ``lora_slots`` names (refilling only changed slots).

        Args:
            lora_slots: adapter id per slot (0: empty), from the step message.
        """
        for slot, adapter_id in enumerate(lora_slots):
            if self.slots[slot] == adapter_id:
                continue
            if adapter_id and adapter_id not in self.host:
                raise LoRAError(f"step asks for adapter id {adapter_id}, which is not loaded")
            shards, scaling = self.host.get(adapter_id, ({}, 0.0))
            for name, layer in self.layers.items():
                layer.set_slot(slot, shards.get(name, [None] * layer.num_parts), scaling)
            self.slots[slot] = adapter_id

    def mapping(self, step: StepInput) -> LoRAMapping | None:
        """Fill the step's slots and map each token to its slot (None: no token uses an adapter).

        Args:
            step: the step message (its chunks' ``lora_id`` and its ``lora_slots``).
        """
        if not any(chunk.lora_id for chunk in step.chunks):
            return None
        self.activate(step.lora_slots)
        slot_of = {adapter_id: s for s, adapter_id in enumerate(step.lora_slots) if adapter_id}
        per_token: list[int] = []
        for chunk in step.chunks:
            slot = slot_of[chunk.lora_id] if chunk.lora_id else -1
            per_token.extend([slot] * len(chunk.token_ids))
        token_slots = torch.tensor(per_token, dtype=torch.long, device=self.device)  # (T,)
        return LoRAMapping(token_slots, self._mask_table[token_slots + 1])  # mask (T, S * R)


def _stage_name(model: nn.Module, global_name: str) -> str | None:
    """``layers.{i}.rest`` (global layer i) as this stage's module name, None off this stage."""
    _, index, rest = global_name.split(".", 2)
    local = int(index) - model.start_layer
    return f"layers.{local}.{rest}" if 0 <= local < len(model.layers) else None


def shard_pair(
    base: LinearBase, part: int, a: LazyTensor, b: LazyTensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B) of fused output ``part``, sharded like ``base`` (module docstring of
    :mod:`mgpu.lora.layers`).

    Args:
        base: the wrapped linear.
        part: its fused output (q, k, v or gate, up), 0 for an unfused one.
        a: the full lora_A (r, in), read lazily (a safetensors slice) or a tensor.
        b: the full lora_B (out, r), likewise.
    """
    # The layer's own window of the checkpoint: on a padded layer (an MLP width the TP size does
    # not divide) it stops at the real width, and the padding's A columns / B rows stay zero.
    rows, cols = base.shard_window(part)
    if isinstance(base, RowParallelLinear):
        full_b = b[:]  # (out, r)
        if cols is None:
            return a[:], full_b  # (r, in_local), (out, r)
        local_a = torch.zeros(full_b.shape[1], base.local_input)  # (r, in_local)
        if cols.stop > cols.start:
            local_a[:, : cols.stop - cols.start] = a[:, cols]
        return local_a, full_b
    full_a = a[:]  # (r, in)
    local_b = torch.zeros(base.shard_rows(part)[2], full_a.shape[0])  # (rows, r)
    if rows.stop > rows.start:
        local_b[: rows.stop - rows.start] = b[rows]
    return full_a, local_b
