"""Automatic placement: the layout the engine builds when none is given, from each device's memory.

Weight bytes come from :func:`mgpu.memory.weight_bytes_per_rank`, the formula the planner and the
KV-cache allocator use, so a refusal here is the planner's own arithmetic. The rule:

* the model fits one device (weights plus a KV reserve): one rank;
* equal devices whose count is a valid TP size for the model: tensor parallelism over all of them;
* otherwise a pipeline over all devices, with an uneven layer split that gives each stage layers in
  proportion to what its memory holds (the stages with the embedding or the LM head take fewer);
* all devices together too small: refused before any weight is read, with the shortfall in GiB.

On CPU, ``--device-memory 24GiB,12GiB`` describes the devices (one budget per rank), so unequal
placement can be tested without GPUs.
"""

from __future__ import annotations

import re

from mgpu.config import ModelConfig, ParallelConfig, valid_tp_sizes
from mgpu.errors import ConfigError
from mgpu.memory import weight_bytes_per_rank

GIB = 2**30
#: Share of a device kept for the KV cache and activations when deciding whether weights fit.
KV_RESERVE = 0.1
_UNITS = {"": GIB, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": GIB}


def parse_memory(text: str | float | int) -> int:
    """Bytes of ``"24GiB"``, ``"512MiB"``, ``"1.5GB"`` or a bare number of GiB.

    Args:
        text: the size.
    """
    if isinstance(text, int | float):
        return int(text * GIB)
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot read the memory size {text!r}; write e.g. 24GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_device_memory(value: str | float | list | tuple | None) -> tuple[int, ...] | None:
    """Per-device budgets in bytes from ``"24GiB,12GiB"``, a list, or one number (GiB).

    Args:
        value: the ``--device-memory`` setting.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        value = [value]
    return tuple(parse_memory(v) for v in value)


def _stage_bytes(model: ModelConfig, bits: int, tp: int, split: tuple[int, ...]) -> list[int]:
    pp, start, out = len(split), 0, []
    for i, n in enumerate(split):
        out.append(
            weight_bytes_per_rank(
                model, bits, tp, (start, start + n), i == 0, i == pp - 1, vector_bytes=bits // 8
            )
        )
        start += n
    return out


def balanced_split(model: ModelConfig, bits: int, budgets: tuple[int, ...]) -> tuple[int, ...]:
    """Layers per stage: each next layer goes to the stage with the lowest load-to-budget ratio.

    Args:
        model: the architecture.
        bits: bits per weight.
        budgets: bytes each stage may fill with weights.
    """
    pp, layers = len(budgets), model.num_hidden_layers
    counts = [1] * pp
    per_layer = weight_bytes_per_rank(model, bits, 1, (0, 1), False, False, bits // 8)
    load = _stage_bytes(model, bits, 1, tuple(counts))
    for _ in range(layers - pp):
        best = min(range(pp), key=lambda i: (load[i] + per_layer) / budgets[i])
        counts[best] += 1
        load[best] += per_layer
    return tuple(counts)


def auto_layout(
    model: ModelConfig, bytes_per_element: int, device_bytes: tuple[int, ...]
) -> ParallelConfig:
    """The layout for ``device_bytes`` (one entry per device), or a refusal naming the shortfall.

    Args:
        model: the architecture.
        bytes_per_element: weight dtype size.
        device_bytes: memory of each device, in bytes.
    """
    bits = bytes_per_element * 8
    usable = tuple(int(b * (1 - KV_RESERVE)) for b in device_bytes)
    whole = weight_bytes_per_rank(model, bits, 1, vector_bytes=bytes_per_element)
    if whole <= usable[0]:
        return ParallelConfig(1, 1)
    n = len(usable)
    if whole > sum(usable):
        short = (whole - sum(usable)) / GIB
        raise ConfigError(
            f"the model's weights need {whole / GIB:.2f} GiB (plus {KV_RESERVE:.0%} of each device "
            f"for the KV cache) but the {n} device(s) offer {sum(usable) / GIB:.2f} GiB together: "
            f"{short:.2f} GiB short; it would fit with {short:.2f} GiB more memory, or at a "
            "smaller dtype (--dtype bfloat16 halves float32 weights)"
        )
    if len(set(usable)) == 1 and n in valid_tp_sizes(model):
        return ParallelConfig(n, 1)
    if n > model.num_hidden_layers:
        raise ConfigError(f"{n} devices but the model has only {model.num_hidden_layers} layers")
    split = balanced_split(model, bits, usable)
    for i, (need, have) in enumerate(zip(_stage_bytes(model, bits, 1, split), usable, strict=True)):
        if need > have:
            raise ConfigError(
                f"no layer split fits: stage {i} needs {need / GIB:.2f} GiB of weights but its "
                f"device offers {have / GIB:.2f} GiB ({(need - have) / GIB:.2f} GiB short)"
            )
    return ParallelConfig(1, n, split)


def resolve_layout(
    model: ModelConfig,
    bytes_per_element: int,
    device: str,
    tensor_parallel_size: int | None,
    pipeline_parallel_size: int | None,
    layer_split: tuple[int, ...] | None,
    placement: str = "auto",
    device_memory: str | float | list | tuple | None = None,
) -> tuple[ParallelConfig, tuple[int, ...] | None]:
    """The layout to build and, on CPU, each rank's memory budget in bytes.

    A layout given by any of ``tensor_parallel_size``, ``pipeline_parallel_size`` and
    ``layer_split`` is taken as it is; otherwise ``placement="auto"`` picks one with
    :func:`auto_layout` from ``device_memory`` (CPU) or each visible GPU's memory.

    Args:
        model: the architecture.
        bytes_per_element: weight dtype size.
        device: ``"cpu"`` or ``"cuda"``.
        tensor_parallel_size: ranks per layer, if given.
        pipeline_parallel_size: stages, if given.
        layer_split: layers per stage, if given.
        placement: ``"auto"`` or ``"manual"``.
        device_memory: CPU budgets (see :func:`parse_device_memory`).
    """
    if placement not in ("auto", "manual"):
        raise ConfigError(f"--placement must be auto or manual, got {placement!r}")
    budgets = parse_device_memory(device_memory)
    manual = tensor_parallel_size is not None or pipeline_parallel_size is not None
    manual = manual or layer_split is not None or placement == "manual"
    if manual:
        pp = pipeline_parallel_size or (len(layer_split) if layer_split else 1)
        config = ParallelConfig(tensor_parallel_size or 1, pp, layer_split)
    else:
        devices = budgets
        if device == "cuda":
            import torch

            count = torch.cuda.device_count()
            devices = tuple(torch.cuda.get_device_properties(i).total_memory for i in range(count))
        config = auto_layout(model, bytes_per_element, devices) if devices else ParallelConfig()
    world = config.world_size
    if budgets is not None and device == "cpu":
        if len(budgets) == 1 and world > 1:
            budgets = tuple(budgets[0] // world for _ in range(world))
        if len(budgets) != world:
            raise ConfigError(
                f"--device-memory lists {len(budgets)} devices but the layout has {world} ranks"
            )
    return config, budgets if device == "cpu" else None
