"""The engine's side of the device slots: which adapter sits in which slot, step by step.

Pure Python (the scheduler's plane). A batch uses at most ``max_loras`` distinct adapters (the
scheduler keeps to that); the table keeps adapters that stay in use where they are and puts new
ones into the least recently used free slots, so a worker refills a slot only when an adapter
joins the batch.
"""

from __future__ import annotations

from collections.abc import Iterable


class SlotTable:
    """Adapter id per device slot, as the workers hold them after the last step sent.

    Args:
        max_loras: device slots.
    """

    def __init__(self, max_loras: int):
        self.slots = [0] * max_loras
        self._last_used = [0] * max_loras
        self._clock = 0

    def assign(self, adapter_ids: Iterable[int]) -> tuple[int, ...]:
        """Place the batch's adapters into slots; returns the adapter id per slot.

        Args:
            adapter_ids: ids of the adapters the batch uses (0, the base model, is ignored).
        """
        needed = {a for a in adapter_ids if a}
        if len(needed) > len(self.slots):
            raise ValueError(
                f"a batch uses {len(needed)} adapters, more than {len(self.slots)} slots"
            )
        self._clock += 1
        for slot, held in enumerate(self.slots):
            if held in needed:
                self._last_used[slot] = self._clock
        missing = sorted(needed - set(self.slots))
        free = sorted(
            (s for s, held in enumerate(self.slots) if held not in needed),
            key=lambda s: self._last_used[s],
        )
        for adapter_id, slot in zip(missing, free, strict=False):
            self.slots[slot] = adapter_id
            self._last_used[slot] = self._clock
        return tuple(self.slots)
