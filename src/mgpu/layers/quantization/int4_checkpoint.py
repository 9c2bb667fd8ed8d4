"""Hugging Face 4-bit checkpoints: AWQ (GEMM) and GPTQ, read shard by shard into int4 weights.

Both store, per linear of shape (N out, K in), 4-bit codes ``q``, 4-bit zero points ``z`` and
fp16 scales ``s`` per group of ``group_size`` input channels, in int32 words of eight nibbles::

    AWQ  qweight (K, N/8)   qzeros (K/G, N/8)   scales (K/G, N)   w = (q - z) * s
         nibbles along N in the order [0, 2, 4, 6, 1, 3, 5, 7] (AutoAWQ's WQLinear_GEMM)
    GPTQ qweight (K/8, N)   qzeros (K/G, N/8)   scales (K/G, N)   g_idx (K,)
         nibbles along K (qweight) and N (qzeros) in order; w = (q - (z + 1)) * s[g_idx]
         (the "+1" of the GPTQ v1 format that AutoGPTQ writes)

Both map exactly onto :class:`Int4Weight` (``(q - 8) * s + z'`` with ``z' = (8 - zero) * s``)
when groups are contiguous runs of K: AWQ always, GPTQ with ``desc_act: false``. GPTQ with
``desc_act: true`` (act-order) assigns input channels to groups out of order; its shard is
dequantised exactly and requantized to per-row int8, which the int8 kernel runs.

A rank reads only its part of each tensor: column-parallel shards take N columns of the packed
words (a multiple of 8), row-parallel shards take K rows (a multiple of the group size).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mgpu.errors import ConfigError, ModelLoadError
from mgpu.layers.quantization.weights import Int4Weight, Int8Weight, pack_nibbles, quantize_int8

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column _AWQ_ORDER[i]
#: Checkpoint suffixes of one quantized projection.
PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Int4CheckpointFormat:
    """What ``quantization_config`` says about the packing."""

    method: str  # "awq" or "gptq"
    group_size: int
    desc_act: bool = False


def checkpoint_format(raw: dict[str, Any], where: str) -> Int4CheckpointFormat:
    """Validate a ``quantization_config``; an unsupported value names its field.

    Args:
        raw: the ``quantization_config`` dict of ``config.json``.
        where: the file, for messages.
    """
    method = raw.get("quant_method")
    if method not in ("awq", "gptq"):
        raise ConfigError(
            f"{where}: quantization_config.quant_method = {method!r} is not supported "
            "(supported: awq, gptq; or a float checkpoint with --quantization int8/int4)"
        )
    bits = raw.get("bits", raw.get("w_bit"))
    if bits != 4:
        raise ConfigError(
            f"{where}: quantization_config.bits = {bits!r}; mgpu reads 4-bit {method}"
        )
    group = raw.get("group_size", raw.get("q_group_size"))
    if not isinstance(group, int) or group <= 0 or group % 8:
        raise ConfigError(f"{where}: quantization_config.group_size = {group!r} is not supported")
    if method == "awq" and str(raw.get("version", "gemm")).lower() != "gemm":
        raise ConfigError(
            f"{where}: quantization_config.version = {raw.get('version')!r}; mgpu reads AWQ GEMM"
        )
    if method == "gptq" and raw.get("sym") is False and raw.get("checkpoint_format") == "gptq_v2":
        raise ConfigError(f"{where}: quantization_config.checkpoint_format = 'gptq_v2' is not read")
    return Int4CheckpointFormat(method, group, bool(raw.get("desc_act", False)))


def _unpack_cols(words: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """(R, C) int32 words -> (R, 8C) codes; nibble i of word c holds column 8c + order[i]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (words[..., None] >> shifts) & 15  # (R, C, 8): nibble i
    inverse = [order.index(j) for j in range(8)]
    return nibbles[..., inverse].reshape(words.shape[0], -1)


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 words -> (8R, C) codes; nibble j of word r holds row 8r + j."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (words[:, None, :] >> shifts[None, :, None]) & 15  # (R, 8, C)
    return nibbles.reshape(-1, words.shape[1])


class Int4CheckpointTensor:
    """The (N, K) weight of one AWQ/GPTQ projection, read lazily from its packed parts.

    Args:
        parts: lazy slices of ``qweight``, ``qzeros``, ``scales`` (and GPTQ's ``g_idx``).
        fmt: the checkpoint's packing.
        name: the projection's checkpoint prefix, for messages.
    """

    def __init__(self, parts: dict[str, Any], fmt: Int4CheckpointFormat, name: str):
        self.parts, self.fmt, self.name = parts, fmt, name
        k_or_k8, n_or_n8 = parts["qweight"].shape
        if fmt.method == "awq":
            self.shape = (n_or_n8 * 8, k_or_k8)
        else:
            self.shape = (n_or_n8, k_or_k8 * 8)

    def _check(self, start: int, stop: int, step: int, what: str) -> None:
        if start % step or stop % step:
            raise ModelLoadError(
                f"{self.name} ({self.fmt.method}): this shard's {what} [{start}, {stop}) do not "
                f"fall on multiples of {step}; choose a tensor-parallel size that does"
            )

    def _codes_scales_zeros(
        self, rows: slice, cols: slice
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (n, k), scales and zero points (n, groups) of the window, as stored."""
        n0, n1 = rows.start or 0, self.shape[0] if rows.stop is None else rows.stop
        k0, k1 = cols.start or 0, self.shape[1] if cols.stop is None else cols.stop
        g = self.fmt.group_size
        self._check(n0, n1, 8, "output rows")
        qw, qz, sc = self.parts["qweight"], self.parts["qzeros"], self.parts["scales"]
        if self.fmt.method == "awq":
            self._check(k0, k1, g, "input columns")
            codes = _unpack_cols(qw[k0:k1, n0 // 8 : n1 // 8], _AWQ_ORDER).T  # (n, k)
            zeros = _unpack_cols(qz[k0 // g : k1 // g, n0 // 8 : n1 // 8], _AWQ_ORDER).T
            return codes, sc[k0 // g : k1 // g, n0:n1].float().T, zeros.float()
        self._check(k0, k1, 8, "input columns")
        codes = _unpack_rows(qw[k0 // 8 : k1 // 8, n0:n1]).T  # (n, k)
        if self.fmt.desc_act:  # every group may be referenced: read them all for these rows
            zeros = _unpack_cols(qz[:, n0 // 8 : n1 // 8], tuple(range(8))).T + 1
            return codes, sc[:, n0:n1].float().T, zeros.float()
        self._check(k0, k1, g, "input columns")
        zeros = _unpack_cols(qz[k0 // g : k1 // g, n0 // 8 : n1 // 8], tuple(range(8))).T + 1
        return codes, sc[k0 // g : k1 // g, n0:n1].float().T, zeros.float()

    def _dequantize(self, rows: slice, cols: slice) -> torch.Tensor:
        codes, scale, zero = self._codes_scales_zeros(rows, cols)
        if self.fmt.method == "gptq" and self.fmt.desc_act:
            k0 = cols.start or 0
            group = self.parts["g_idx"][k0 : k0 + codes.shape[1]].long()  # (k,)
            return (codes.float() - zero[:, group]) * scale[:, group]
        g = self.fmt.group_size
        n, k = codes.shape
        w = (codes.float().view(n, k // g, g) - zero[..., None]) * scale[..., None]
        return w.view(n, k)

    def __getitem__(self, index: object) -> torch.Tensor:
        """Dequantised float32 ``[rows]`` or ``[rows, cols]`` (``...`` for all)."""
        if index is Ellipsis:
            return self._dequantize(slice(None), slice(None))
        if isinstance(index, tuple):
            return self._dequantize(*index)  # type: ignore[misc]
        return self._dequantize(index, slice(None))  # type: ignore[arg-type]

    def read_packed(self, rows: slice, cols: slice | None) -> Int4Weight | Int8Weight:
        """The shard as int4 (exact), or per-row int8 for GPTQ act-order."""
        cols = cols or slice(0, self.shape[1])
        if self.fmt.method == "gptq" and self.fmt.desc_act:
            return quantize_int8(self._dequantize(rows, cols))
        codes, scale, zero = self._codes_scales_zeros(rows, cols)
        return Int4Weight(pack_nibbles(codes), scale, (8.0 - zero) * scale, self.fmt.group_size)


class _Slice:
    def __init__(self, raw: Any):
        self._raw, self.shape = raw, tuple(raw.get_shape())

    def __getitem__(self, index: object) -> torch.Tensor:
        return self._raw[:] if index is Ellipsis else self._raw[index]


def load_int4_checkpoint(
    model: nn.Module, files: list[Path], fmt: Int4CheckpointFormat, known: set[str]
) -> None:
    """Fill ``model`` from an AWQ/GPTQ checkpoint's safetensors files, strictly.

    Args:
        model: a model built for this rank under the checkpoint's quantization config.
        files: the checkpoint files.
        fmt: the packing.
        known: every HF name a float checkpoint of this config may hold.
    """
    from mgpu.layers.quantization import finish_loading

    wanted = model.checkpoint_names()  # type: ignore[operator]
    with contextlib.ExitStack() as stack:
        where: dict[str, Any] = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                base, _, suffix = name.rpartition(".")
                as_weight = f"{base}.weight" if suffix in PARTS else name
                if as_weight not in known and not name.endswith("rotary_emb.inv_freq"):
                    raise ModelLoadError(f"unexpected tensor {name!r} in {file.name}")
                where[name] = handle
        for name, (param, shard) in wanted.items():
            base = name.removesuffix(".weight")
            if f"{base}.qweight" in where:
                parts = {
                    p: _Slice(where[f"{base}.{p}"].get_slice(f"{base}.{p}"))
                    for p in PARTS
                    if f"{base}.{p}" in where
                }
                loaded: Any = Int4CheckpointTensor(parts, fmt, base)
            elif name in where:
                loaded = _Slice(where[name].get_slice(name))
            else:
                raise ModelLoadError(f"checkpoint is missing tensor {name} (or its qweight)")
            param.checkpoint_name = name
            param.weight_loader(param, loaded, shard)
    finish_loading(model)
