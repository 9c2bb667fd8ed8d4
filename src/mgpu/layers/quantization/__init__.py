"""Quantized weights of the parallel linears: the method seam, int8/int4 and their kernels.

``--quantization int8`` stores every linear as int8 with one scale per output row;
``--quantization int4`` as 4-bit codes with a scale and zero point per group of
``DEFAULT_INT4_GROUP_SIZE`` (128) input columns. Both are applied tensor by tensor while loading.
See docs/quantization.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mgpu.errors import ConfigError
from mgpu.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    current_quant_config,
    quantization_scope,
)
from mgpu.layers.quantization.int4_checkpoint import Int4CheckpointFormat, checkpoint_format
from mgpu.layers.quantization.method import DEFAULT_INT4_GROUP_SIZE, WeightOnlyConfig
from mgpu.memory import LinearStorage, WeightFormat

#: ``--quantization`` values for float checkpoints.
QUANTIZATION_CHOICES = ("int8", "int4")

__all__ = [
    "DEFAULT_INT4_GROUP_SIZE",
    "QUANTIZATION_CHOICES",
    "LinearMethodBase",
    "QuantizationConfig",
    "WeightOnlyConfig",
    "checkpoint_quant_format",
    "current_quant_config",
    "finish_loading",
    "get_quantization_config",
    "quant_config_for",
    "quantization_scope",
    "weight_format",
]


def get_quantization_config(
    name: str | None, group_size: int = DEFAULT_INT4_GROUP_SIZE
) -> QuantizationConfig | None:
    """The config behind ``--quantization NAME`` (None for no quantization).

    Args:
        name: ``int8``, ``int4``, or None / ``none``.
        group_size: int4 columns per scale/zero pair.
    """
    if name is None or name == "none":
        return None
    if name == "int8":
        return WeightOnlyConfig(name="int8", bits=8, group_size=group_size)
    if name == "int4":
        return WeightOnlyConfig(name="int4", bits=4, group_size=group_size)
    raise ConfigError(
        f"unknown quantization {name!r}; --quantization takes {', '.join(QUANTIZATION_CHOICES)} "
        "(a GGUF file, AWQ or GPTQ checkpoint brings its own)"
    )


def finish_loading(model: nn.Module) -> None:
    """Run every parallel linear's ``process_weights_after_loading`` (once, after loading)."""
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None:
            hook()


def quant_config_for(
    model_path: str | os.PathLike[str], name: str | None
) -> QuantizationConfig | None:
    """The quantization of a model: a GGUF file's own types, an AWQ/GPTQ checkpoint's packing,
    else ``--quantization NAME``.

    Args:
        model_path: the resolved model (a HF directory, or a GGUF file).
        name: the ``--quantization`` value (None: as stored).
    """
    if Path(model_path).is_file():  # GGUF (a HF model is a directory)
        from mgpu.models.gguf import gguf_quant_config

        return gguf_quant_config(Path(model_path), None if name == "gguf" else name)
    if name == "gguf":
        raise ConfigError(f"--quantization gguf: {model_path} is a directory, not a GGUF file")
    fmt = checkpoint_quant_format(Path(model_path))
    if name in ("awq", "gptq"):
        # vLLM's names for a checkpoint's own packing: accepted when the checkpoint has it.
        if fmt is None or fmt.method != name:
            have = f"a {fmt.method} checkpoint" if fmt else "a float checkpoint"
            raise ConfigError(f"--quantization {name}: {model_path} is {have}")
        name = None
    if fmt is not None:
        if name is not None:
            raise ConfigError(
                f"{model_path} is already a 4-bit {fmt.method} checkpoint; "
                f"drop --quantization {name}"
            )
        return WeightOnlyConfig(name=fmt.method, bits=None)
    return get_quantization_config(name)


def checkpoint_quant_format(model_dir: Path) -> Int4CheckpointFormat | None:
    """The AWQ/GPTQ packing a checkpoint's ``config.json`` declares (None for a float one); an
    unsupported ``quantization_config`` fails naming the field and its value."""
    from mgpu.config import read_config_json

    raw = read_config_json(model_dir).get("quantization_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{model_dir}/config.json: quantization_config is not an object")
    return checkpoint_format(raw, f"{model_dir}/config.json")


def weight_format(
    model_path: str | os.PathLike[str], name: str | None, dtype: torch.dtype
) -> WeightFormat:
    """What the engine will store for this model, for :func:`mgpu.memory.predicted_weight_bytes`
    (the startup table's and ``--dry-run``'s predicted bytes); reads metadata only.

    Args:
        model_path: the resolved model (a HF directory, or a GGUF file).
        name: the ``--quantization`` value (None: as stored).
        dtype: the model (activation) dtype.
    """
    elem = torch.finfo(dtype).bits // 8
    config = quant_config_for(model_path, name)
    if Path(model_path).is_file():
        from mgpu.models.gguf import gguf_weight_format

        return gguf_weight_format(Path(model_path), None if config is None else config.bits, elem)
    if config is None:
        return WeightFormat.unquantized(elem)
    assert isinstance(config, WeightOnlyConfig)
    if config.bits is None:  # an AWQ/GPTQ checkpoint's own packing
        fmt = checkpoint_quant_format(Path(model_path))
        assert fmt is not None
        if fmt.method == "gptq" and fmt.desc_act:  # act-order groups: requantized to int8
            return WeightFormat(LinearStorage("int8", elem), elem)
        return WeightFormat(LinearStorage("int4", elem, fmt.group_size), elem)
    kind = "int8" if config.bits == 8 else "int4"
    return WeightFormat(LinearStorage(kind, elem, config.group_size), elem)
