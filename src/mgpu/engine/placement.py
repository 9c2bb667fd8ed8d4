"""Automatic placement: the layout the engine builds when none is given, from each device's memory
and speed.

Weight bytes come from :func:`mgpu.memory.weight_bytes_per_rank`, the formula the planner and the
KV-cache allocator use, and the layer split from the planner's
:func:`~mgpu.planner.placement.split_layers`, so a refusal here is the planner's own arithmetic.
The rule:

* the model fits one device (weights plus a KV reserve): one rank;
* equal devices (memory and speed) whose count is a valid TP size for the model: tensor
  parallelism over all of them. On unequal devices TP does not pay: every rank of a layer waits
  for the slowest and holds as much as the smallest;
* otherwise a pipeline over all devices, with an uneven layer split: in proportion to each
  device's speed where its memory allows, or (speeds unknown) to what its memory holds; the
  stages with the embedding or the LM head take fewer;
* all devices together too small: refused before any weight is read, with the shortfall in GiB.

On CPU, ``--device-memory 24GiB,12GiB`` and ``--device-speed 2,1`` describe the devices (one entry
per rank), so unequal placement can be tested without GPUs; on CUDA the memory is each GPU's and
the speed its memory bandwidth from the planner's GPU table (decode reads every weight once).

An explicit ``--tensor-parallel-size`` the model's heads do not divide keeps its device count:
the largest TP size below it that divides both the heads and the device count, the rest made up
with pipeline stages (``-tp 3`` on 32 heads: PP 3; ``-tp 6``: TP 2 x PP 3), announced in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mgpu.config import ModelConfig, ParallelConfig, valid_tp_sizes
from mgpu.errors import ConfigError
from mgpu.memory import weight_bytes_per_rank
from mgpu.planner.placement import split_layers

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


def _per_device(value: str | float | list | tuple) -> list:
    """One entry per device from ``"a,b"``, a list or tuple, or a single value."""
    if isinstance(value, str):
        return [v for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, list | tuple) else [value]


def parse_device_memory(value: str | float | list | tuple | None) -> tuple[int, ...] | None:
    """Per-device budgets in bytes from ``"24GiB,12GiB"``, a list, or one number (GiB).

    Args:
        value: the ``--device-memory`` setting.
    """
    if value is None:
        return None
    return tuple(parse_memory(v) for v in _per_device(value))


def parse_device_speed(value: str | float | list | tuple | None) -> tuple[float, ...] | None:
    """Relative throughput of each device from ``"2,1"``, a list, or one number.

    Args:
        value: the ``--device-speed`` setting.
    """
    if value is None:
        return None
    try:
        speeds = tuple(float(v) for v in _per_device(value))
    except ValueError:
        raise ConfigError(f"--device-speed takes numbers like 2,1, got {value!r}") from None
    if any(v <= 0 for v in speeds):
        raise ConfigError(f"--device-speed entries must be positive, got {value!r}")
    return speeds


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


def balanced_split(
    model: ModelConfig,
    bits: int,
    budgets: tuple[int, ...],
    speeds: tuple[float, ...] | None = None,
) -> tuple[int, ...]:
    """Layers per stage, with the planner's :func:`~mgpu.planner.placement.split_layers`: by
    ``speeds`` where ``budgets`` allow, or by ``budgets`` alone.

    Args:
        model: the architecture.
        bits: bits per weight.
        budgets: bytes each stage may fill with weights.
        speeds: relative throughput of each stage (None: split by memory).
    """
    pp = len(budgets)
    per_layer = weight_bytes_per_rank(model, bits, 1, (0, 1), False, False, bits // 8)
    fixed = [b - per_layer for b in _stage_bytes(model, bits, 1, (1,) * pp)]
    return split_layers(model.num_hidden_layers, per_layer, fixed, budgets, speeds)


def auto_layout(
    model: ModelConfig,
    bytes_per_element: int,
    device_bytes: tuple[int, ...],
    device_speed: tuple[float, ...] | None = None,
) -> ParallelConfig:
    """The layout for ``device_bytes`` (one entry per device), or a refusal naming the shortfall.

    Args:
        model: the architecture.
        bytes_per_element: weight dtype size.
        device_bytes: memory of each device, in bytes.
        device_speed: relative throughput of each device (None: unknown, split by memory).
    """
    bits = bytes_per_element * 8
    usable = tuple(int(b * (1 - KV_RESERVE)) for b in device_bytes)
    n = len(usable)
    if device_speed is not None and len(device_speed) != n:
        raise ConfigError(
            f"--device-speed lists {len(device_speed)} devices but --device-memory lists {n}"
        )
    whole = weight_bytes_per_rank(model, bits, 1, vector_bytes=bytes_per_element)
    if whole <= usable[0]:
        return ParallelConfig(1, 1)
    if whole > sum(usable):
        short = (whole - sum(usable)) / GIB
        raise ConfigError(
            f"the model's weights need {whole / GIB:.2f} GiB (plus {KV_RESERVE:.0%} of each device "
            f"for the KV cache) but the {n} device(s) offer {sum(usable) / GIB:.2f} GiB together: "
            f"{short:.2f} GiB short; it would fit with {short:.2f} GiB more memory, or at a "
            "smaller dtype (--dtype bfloat16 halves float32 weights)"
        )
    equal_speed = device_speed is None or len(set(device_speed)) == 1
    if len(set(usable)) == 1 and equal_speed and n in valid_tp_sizes(model):
        return ParallelConfig(n, 1)
    if n > model.num_hidden_layers:
        raise ConfigError(f"{n} devices but the model has only {model.num_hidden_layers} layers")
    split = balanced_split(model, bits, usable, None if equal_speed else device_speed)
    for i, (need, have) in enumerate(zip(_stage_bytes(model, bits, 1, split), usable, strict=True)):
        if need > have:
            raise ConfigError(
                f"no layer split fits: stage {i} needs {need / GIB:.2f} GiB of weights but its "
                f"device offers {have / GIB:.2f} GiB ({(need - have) / GIB:.2f} GiB short)"
            )
    return ParallelConfig(1, n, split)


def fit_tensor_parallel(
    model: ModelConfig, config: ParallelConfig
) -> tuple[ParallelConfig, str | None]:
    """A layout for an explicit TP size the model's heads do not divide, on the same devices.

    The largest TP size below the requested one that divides the heads (:func:`valid_tp_sizes`)
    and the device count, the remaining factor as pipeline stages. Returns the layout and the line
    that says what was chosen and why (None when ``config`` is valid as given).

    Args:
        model: the architecture.
        config: the layout asked for.
    """
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    valid = valid_tp_sizes(model)
    if tp in valid:
        return config, None
    devices = tp * pp
    layers = model.num_hidden_layers
    options = [t for t in valid if t < tp and devices % t == 0 and devices // t <= layers]
    if not options:
        return config, None  # nothing on these devices works: check_model names the valid sizes
    new_tp = max(options)
    new_pp = devices // new_tp
    split = config.layer_split
    if split is not None and len(split) != new_pp:
        raise ConfigError(
            f"-tp {tp} does not divide the model's {model.num_attention_heads} attention heads; "
            f"on {devices} devices TP {new_tp} x PP {new_pp} works, but --layer-split lists "
            f"{len(split)} stages: give {new_pp} entries or leave it out"
        )
    fitted = ParallelConfig(new_tp, new_pp, split, config.enable_expert_parallel)
    note = (
        f"placement: -tp {tp} does not divide the model's {model.num_attention_heads} attention "
        f"heads / {model.num_key_value_heads} KV heads (TP sizes that do: "
        f"{', '.join(map(str, valid))}); running TP {new_tp} x PP {new_pp} on the same "
        f"{devices} devices instead"
    )
    return fitted, note


@dataclass(frozen=True)
class Placement:
    """What :func:`resolve_layout` decided."""

    parallel_config: ParallelConfig
    #: On CPU, each rank's memory budget in bytes (None: the available RAM).
    rank_memory_bytes: tuple[int, ...] | None
    #: One line saying what was chosen instead of what was asked, and why (None: as asked).
    note: str | None = None


def _cuda_devices() -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """Each visible GPU's memory, and its bandwidth from the planner's GPU table (None when a GPU
    is not in it)."""
    import torch

    from mgpu.planner.hardware import find_gpu

    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    speeds: list[float] = []
    for p in props:
        try:
            bandwidth = find_gpu(p.name)[0].bandwidth_gbs
        except ConfigError:
            bandwidth = None
        if bandwidth is None:
            return tuple(p.total_memory for p in props), None
        speeds.append(bandwidth)
    return tuple(p.total_memory for p in props), tuple(speeds)


def resolve_layout(
    model: ModelConfig,
    bytes_per_element: int,
    device: str,
    tensor_parallel_size: int | None,
    pipeline_parallel_size: int | None,
    layer_split: tuple[int, ...] | None,
    placement: str = "auto",
    device_memory: str | float | list | tuple | None = None,
    device_speed: str | float | list | tuple | None = None,
) -> Placement:
    """The layout to build and, on CPU, each rank's memory budget in bytes.

    A layout given by any of ``tensor_parallel_size``, ``pipeline_parallel_size`` and
    ``layer_split`` is taken as it is (a TP size the heads do not divide is fitted with
    :func:`fit_tensor_parallel`); otherwise ``placement="auto"`` picks one with
    :func:`auto_layout` from ``device_memory`` and ``device_speed`` (CPU) or each visible GPU.
    ``device_speed`` beside a fixed layout, or on CPU without ``device_memory``, is refused: it
    would be ignored.

    Args:
        model: the architecture.
        bytes_per_element: weight dtype size.
        device: ``"cpu"`` or ``"cuda"``.
        tensor_parallel_size: ranks per layer, if given.
        pipeline_parallel_size: stages, if given.
        layer_split: layers per stage, if given.
        placement: ``"auto"`` or ``"manual"``.
        device_memory: CPU budgets (see :func:`parse_device_memory`).
        device_speed: relative device throughput (see :func:`parse_device_speed`); on CUDA it
            replaces the GPU table's bandwidths.
    """
    if placement not in ("auto", "manual"):
        raise ConfigError(f"--placement must be auto or manual, got {placement!r}")
    budgets = parse_device_memory(device_memory)
    speeds = parse_device_speed(device_speed)
    fixed = [
        flag
        for flag, given in (
            ("-tp", tensor_parallel_size is not None),
            ("-pp", pipeline_parallel_size is not None),
            ("--layer-split", layer_split is not None),
            ("--placement manual", placement == "manual"),
        )
        if given
    ]
    manual = bool(fixed)
    if speeds is not None:
        _check_speeds_apply(fixed, device, budgets)
    note = None
    if manual:
        pp = pipeline_parallel_size or (len(layer_split) if layer_split else 1)
        config = ParallelConfig(tensor_parallel_size or 1, pp, layer_split)
        config, note = fit_tensor_parallel(model, config)
    else:
        devices = budgets
        if device == "cuda":
            devices, table_speeds = _cuda_devices()
            speeds = speeds or table_speeds
        if devices and speeds is not None and len(speeds) == 1:
            speeds = speeds * len(devices)
        config = auto_layout(model, bytes_per_element, devices, speeds) if devices else None
        config = config or ParallelConfig()
        if budgets is not None and config.world_size < len(budgets):
            budgets = budgets[: config.world_size]  # fits the first device(s): the rest stay idle
        if config.layer_split is not None:
            note = (
                f"placement auto: PP {config.pipeline_parallel_size}, layers per stage "
                f"{','.join(map(str, config.layer_split))} "
                + (
                    "by device speed within memory"
                    if speeds and len(set(speeds)) > 1
                    else "by memory"
                )
            )
    world = config.world_size
    if budgets is not None and device == "cpu":
        if len(budgets) == 1 and world > 1:
            budgets = tuple(budgets[0] // world for _ in range(world))
        if len(budgets) != world:
            raise ConfigError(
                f"--device-memory lists {len(budgets)} devices but the layout has {world} ranks"
            )
    return Placement(config, budgets if device == "cpu" else None, note)


def _check_speeds_apply(fixed: list[str], device: str, budgets: tuple[int, ...] | None) -> None:
    """Refuse ``--device-speed`` where it would change nothing: it splits the layers of an
    automatic layout only, and on CPU it speaks of the devices ``--device-memory`` lists.

    Args:
        fixed: the flags given that fix the layout (``-tp``, ``-pp``, ...).
        device: ``"cpu"`` or ``"cuda"``.
        budgets: the parsed ``--device-memory``, if given.
    """
    if fixed:
        flags = " and ".join(fixed)
        raise ConfigError(
            f"--device-speed splits the layers of an automatic layout, but {flags} fixes the "
            f"layout; drop --device-speed, or drop {flags} to let the speeds place the layers"
        )
    if device == "cpu" and budgets is None:
        raise ConfigError(
            "--device-speed on CPU gives the speed of each device --device-memory lists; "
            "give --device-memory too (one entry per device)"
        )
