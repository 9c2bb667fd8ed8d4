"""Weight-only int8/int4 linears: the kernels against the dequantising path, the quantizers
against their error bounds, and the sharded layers against the unsharded one."""

from __future__ import annotations

import pytest
import torch

from mgpu.distributed import parallel_state as ps
from mgpu.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mgpu.layers.quantization import (
    WeightOnlyConfig,
    finish_loading,
    get_quantization_config,
    quantization_scope,
)
from mgpu.layers.quantization.weights import (
    Int4Weight,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)


class _Full:
    """A whole in-memory tensor behaving as a lazy checkpoint slice."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape = t, tuple(t.shape)

    def __getitem__(self, index: object) -> torch.Tensor:
        return self.t[index]  # type: ignore[index]


def _load(layer: torch.nn.Module, parts: list[torch.Tensor]) -> None:
    for shard, t in enumerate(parts):
        layer.weight.checkpoint_name = f"w{shard}"  # type: ignore[union-attr]
        layer.weight_loader(layer.weight, _Full(t), shard)  # type: ignore[operator]
    finish_loading(layer)


def test_nibbles_round_trip() -> None:
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def test_quantizer_error_bounds() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q8 = quantize_int8(w)
    assert (q8.dequantize() - w).abs().max() <= q8.scale.max() / 2 + 1e-6
    q4 = quantize_int4(w, 32)
    step = q4.scale[:, :, None].expand(-1, -1, 32).reshape(64, 256)  # (N, K) per-element step
    assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_dequantising_path(bits: int, dtype: torch.dtype) -> None:
    """The fused PyTorch kernel and the block-by-block path compute the same product; an fp32
    model keeps the exact dequantising path even when kernels are allowed."""
    torch.manual_seed(0)
    w = [torch.randn(96, 256), torch.randn(64, 256)]
    x = torch.randn(5, 256, dtype=dtype)
    outs = []
    for use_kernel in (True, False):
        config = WeightOnlyConfig(
            name=f"int{bits}", bits=bits, group_size=64, use_kernel=use_kernel
        )
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with quantization_scope(config):
                layer = ColumnParallelLinear(256, [96, 64])
        finally:
            torch.set_default_dtype(previous)
        _load(layer, w)
        outs.append(layer(x).float())
        if bits == 4:
            layout = layer.packed_parts[0].layout  # type: ignore[union-attr]
            assert layout == ("cpu" if use_kernel and dtype == torch.bfloat16 else "nibbles")
    ref_w = torch.cat(w)
    dense = x.float() @ ref_w.T
    # Kernel vs dequantised maths in the same activation dtype: rounding only.
    atol = (0.01 if dtype == torch.bfloat16 else 1e-5) * dense.abs().max().item()
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=atol)
    # Both are close to the float product (the quantization error).
    tol = (0.02 if bits == 8 else 0.15) * dense.abs().max().item()
    assert (outs[1] - dense).abs().max() <= tol


@pytest.mark.parametrize("k", [24, 40, 8])
def test_int8_kernel_is_skipped_where_it_cannot_run(k: int) -> None:
    """PyTorch's CPU int8 kernel crashes (SIGSEGV) unless K is a multiple of 16; a narrow shard
    (a 48-column expert over TP=2) takes the dequantising path instead."""
    torch.manual_seed(0)
    q8 = quantize_int8(torch.randn(32, k))
    x = torch.randn(3, k, dtype=torch.bfloat16)
    ref = x.float() @ q8.dequantize().T
    got = q8.matmul(x, use_kernel=True).float()
    assert torch.allclose(got, ref, rtol=0, atol=0.02 * ref.abs().max().item())


def test_int4_group_falls_back_to_a_divisor() -> None:
    with quantization_scope(get_quantization_config("int4", group_size=128)):
        layer = RowParallelLinear(96, 32)
    assert layer.quant_group_size == 32


def test_unknown_quantization_names_the_value() -> None:
    from mgpu.errors import ConfigError

    with pytest.raises(ConfigError, match="'int3'"):
        get_quantization_config("int3")


@pytest.fixture
def tp2(monkeypatch: pytest.MonkeyPatch):
    """Set the TP state of this process to (rank, size 2) for layer construction."""

    def set_rank(rank: int) -> None:
        state = ps._State()
        state.tp_size, state.tp_rank = 2, rank
        monkeypatch.setattr(ps, "_STATE", state)

    return set_rank


@pytest.mark.parametrize("bits", [8, 4])
def test_tp_shards_reassemble_the_unsharded_layer(tp2, bits: int) -> None:
    """QKV (column) and o_proj (row) shards of rank 0 and 1 give the unsharded outputs."""
    torch.manual_seed(1)
    config = WeightOnlyConfig(name=f"int{bits}", bits=bits, group_size=64)
    q, k, v = torch.randn(128, 128), torch.randn(64, 128), torch.randn(64, 128)
    o = torch.randn(128, 128)
    x, h = torch.randn(3, 128), torch.randn(3, 128)
    with quantization_scope(config):
        full_qkv = QKVParallelLinear(128, 16, 8, 4, bias=False)
        full_o = RowParallelLinear(128, 128)
    _load(full_qkv, [q, k, v])
    _load(full_o, [o])
    ref, ref_o = full_qkv(x), full_o(h)  # (3, [q 128 | k 64 | v 64]), (3, 128)
    qkv_out, o_parts = [], []
    for rank in (0, 1):
        tp2(rank)
        with quantization_scope(config):
            qkv, row = QKVParallelLinear(128, 16, 8, 4, bias=False), RowParallelLinear(128, 128)
        _load(qkv, [q, k, v])
        _load(row, [o])
        qkv_out.append(qkv(x))
        o_parts.append(row.quant_method.apply(row, h[:, rank * 64 : (rank + 1) * 64]))
    got = torch.cat(
        [torch.cat([r[:, :64] for r in qkv_out], 1)]
        + [torch.cat([r[:, 64 + 32 * i : 96 + 32 * i] for r in qkv_out], 1) for i in range(2)],
        1,
    )
    assert torch.allclose(got, ref, atol=1e-5)
    scale = ref_o.abs().max().item()
    # Row shards: int4 groups never cross the cut, so the sum is the unsharded product up to
    # the bf16 kernel rounding; int8 has one scale per row *per shard*, slightly finer.
    assert (o_parts[0] + o_parts[1] - ref_o).abs().max() <= 0.02 * scale
    assert isinstance(full_o.packed_parts[0], Int4Weight) == (bits == 4)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_paths_match_the_cpu_dequantising_path(bits: int) -> None:
    """On CUDA: int4 through ``_weight_int4pack_mm``, int8 through the dequantising path."""
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    config = WeightOnlyConfig(name=f"int{bits}", bits=bits, group_size=128)
    outs = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device), quantization_scope(config):
                layer = ColumnParallelLinear(512, [256])
        finally:
            torch.set_default_dtype(previous)
        _load(layer, [w])
        outs.append(layer(x.to(device, dtype)).float().cpu())
    if bits == 4:
        assert layer.packed_parts[0].layout == "cuda"  # type: ignore[union-attr]
    assert torch.allclose(outs[0], outs[1], atol=0.02 * outs[0].abs().max().item())
