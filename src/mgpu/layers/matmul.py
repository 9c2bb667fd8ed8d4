"""The float matrix product of every dense layer: ``F.linear`` on GPU; oneDNN and mgpu's skinny
kernel on CPU.

**oneDNN on CPU.** PyTorch's CPU ``F.linear`` in float32 calls MKL, whose kernels on AMD CPUs take
a generic path: on a 2-core EPYC (AVX-512 with BF16) it read weights at 14-20 GB/s for one row and
multiplied 32 rows at 70-100 GFLOPS. oneDNN, also inside every x86 PyTorch build, picks its kernels
from the CPU's instruction sets on any vendor, and with the weight reordered once into its own
blocked layout (:func:`cpu_packed_weight`, at load time) multiplies the same shapes 1.3-3x faster.
Measured on that CPU, 2 threads, weights beyond the cache, microseconds (``aten`` is ``F.linear``,
``plain`` is oneDNN on the unreordered weight)::

    (out, in)       dtype  rows    aten   plain  packed
    4096 x 1024     fp32      1    1050     850     661
    4096 x 1024     fp32     32    3114    1705    1218
    4096 x 1024     fp32    256   16342    5609    5783
    32000 x 1024    fp32     32   26445   10180    7645
    4096 x 1024     bf16      1     519     498     341
    32000 x 1024    bf16     32    5966    6599    4571

So the parallel linears and an untied LM head hold reordered weights on CPU in float32 and
bfloat16 (:meth:`UnquantizedLinearMethod.process_weights_after_loading`); a weight that must stay
plain (an LM head tied to the embedding, which looks rows up; the MoE experts' stacked weights)
takes oneDNN on the plain weight in float32 and ``F.linear`` in bfloat16, the faster of the two
there. ``torch.compile`` cannot lower oneDNN's reordered weights, so a model loaded for
compiled decode keeps plain weights (:func:`keep_plain_weights`) and traced products take
``F.linear``, which Inductor plans itself. ``MGPU_CPU_ONEDNN=0`` in the environment turns all of
it off (``F.linear`` everywhere), for comparisons and as a way out should a oneDNN build
misbehave.

**float16 on CPU.** PyTorch's CPU float16 GEMM has no native kernel on CPUs without AVX512-FP16 or
AMX-FP16 (oneDNN refuses the type there) and falls back to a generic loop: with several rows it
runs 2-3x slower than float32 on the same weights. Its matrix-vector path is fast (half the bytes
of float32), so one row stays as it is, and from :data:`FP16_UPCAST_MIN_ROWS` rows up the weight
is turned into float32 a block of rows at a time (a block fits in cache, so the copy costs little)
and multiplied with float32 accumulation (by oneDNN where it is on). Measured on the same CPU, one
thread, float16 weights, MKL's float32 products, blocks of 1 MB (4 MB measured the same, 16 MB
slower)::

    (out, in) x rows     F.linear fp16   blocked fp32   fp32 weights
    4096 x 1024 x 8          2.79 ms        1.56 ms        1.48 ms
    4096 x 1024 x 32        11.19 ms        3.48 ms        3.58 ms
    32000 x 1024 x 32       86.79 ms       28.38 ms       34.40 ms
    4096 x 1024 x 1          0.32 ms        0.81 ms        0.48 ms   (one row: kept as fp16)

Where the CPU has native float16 kernels (AVX512-FP16 or AMX-FP16, :data:`NATIVE_FP16_GEMM`)
``F.linear`` multiplies float16 as it is and beats the blocked path (1534 against 1664 us for
4096 x 1024 at 32 rows on a Sapphire Rapids Xeon, 14.0 against 19.6 ms for 32000 x 1024), so
there float16 is not upcast. On AMX CPUs likewise, plain bfloat16 weights leave the skinny
kernel below for ``F.linear`` from 5 rows (:func:`skinny_max_rows`).

**Small weights take ``F.linear``.** A oneDNN product costs some 30 microseconds before it
multiplies anything, more than the whole product of a small weight: on a 2-core Sapphire Rapids
Xeon (AVX-512, AMX), 2 threads, float32, microseconds::

    (out, in)      rows    aten   plain  packed
    512 x 256         1      14      46      43
    1536 x 256        1      29      57      50
    1536 x 256       32     167     268     184
    768 x 768         1      33      93      57
    768 x 768        32     318     349     192
    3072 x 768        1     279     344     323
    3072 x 768       32    1678    1270    1030

So weights of fewer than :data:`ONEDNN_MIN_ELEMENTS` elements stay plain and take ``F.linear``
(MKL, which multiplies them on one thread with no set-up; decode rows now take the skinny kernel
below, faster still): with oneDNN off the demo model's
single-stream decode went from 140 to 210-280 tokens/s, and the small 32-row products above were
as fast or faster; from 768 x 768 up the reordered weight wins at 32 rows, and ~140M-parameter
models keep every weight reordered. ``MGPU_CPU_ONEDNN_MIN_ELEMENTS`` in the environment moves
the threshold (the test suite sets it to 0 so that its tiny models run through the reordered
weights).

**Decode rows of plain weights take the skinny kernel.** A weight left plain (a small one, a
tied LM head, float16, MoE experts) is multiplied by up to :data:`SKINNY_MAX_ROWS` rows through
``skinny_linear`` of :mod:`mgpu.layers.cpu_kernels`: each thread streams its share of the
weight's rows once, converted to float32 in registers. Measured on a 2-core EPYC (AVX-512 with
BF16, no FP16), 2 threads, weights beyond the cache, microseconds::

    (out, in)      dtype  rows    aten   packed  skinny
    1536 x 256     fp32      1      27       28      10
    1536 x 256     fp32      4      81       29      20
    4096 x 1024    fp32      1    1088      400     415
    4096 x 1024    fp32      8    1626      519     590
    32000 x 1024   fp32      1    7747     2151    1831
    32000 x 1024   fp32      2   15749     3987    3153
    4096 x 1024    bf16      1     414      203     203
    4096 x 1024    fp16      1     259        -     254
    4096 x 1024    fp16      4    1044        -     330
    4096 x 1024    fp16     32    6559        -    1275

So the kernel matches oneDNN's reordered weights at 1-4 rows (reordered weights keep oneDNN,
which wins from 8 rows on) and replaces MKL's ``F.linear`` on the weights that stay plain; for
float16 and the other :data:`UPCAST_DTYPES` it also beats the blocked float32 path up to 32 rows.
Single-stream decode through ``LLM(...)``, the same CPU, engines timed in turns, kernel on against
``MGPU_CPU_SKINNY=0``: demo model 601 against 411 tokens/s, ~140M Llama 42 against 36 (float32),
79 against 69 (float16), 64 against 61 (bfloat16).

**bfloat16 by bfloat16, natively.** Where the CPU has AVX512-BF16 (Zen 4 and later, Sapphire
Rapids and later) the kernel multiplies bfloat16 rows by a bfloat16 weight with ``vdpbf16ps``
(32 pairs per instruction, float32 sums) instead of widening every weight element to float32,
and so takes plain bfloat16 weights (the tied LM head above all) up to
:data:`NATIVE_BF16_MAX_ROWS` rows. Measured on a 2-core EPYC (AVX-512 with BF16), 2 threads,
weights beyond the cache, microseconds (``widen`` is the float32 path of the same kernel)::

    (out, in)      rows    aten   widen  native
    32000 x 1024      1    5705    3657    3313
    32000 x 1024      4    6101    6306    5280
    32000 x 1024     16    7098    9286    6420
    32000 x 1024     32   10580   18207   10257
    32000 x 1024     64   16376   34295   16949
    4096 x 1024       4     612     648     328
    4096 x 1024      32    1211    2206    1307

Against oneDNN's reordered weights the native path is 20-30% faster at 1-4 rows (the 140M
Llama's twelve layers: 8.2 against 10.4 ms at one row) but 1.3-1.6x slower from 8 rows (its
dot products end in a horizontal sum per output, and the plain layout gives each block four
weight streams), so the layers' bfloat16 weights stay reordered: serving many sequences is
where a CPU server earns its keep. A weight layout the kernel reads at every batch size is the
way to both.

On CUDA every dtype takes ``F.linear``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mgpu.layers import cpu_kernels

#: Rows from which CPU float16 products take the blocked float32 path (at 4 rows it already won
#: in all three shapes measured above; at 2 it lost on the narrow one).
FP16_UPCAST_MIN_ROWS = 4
#: Bytes of one float32 weight block: small enough to stay in cache while it is multiplied.
_BLOCK_BYTES = 2 * 2**20


#: Weights with fewer elements than this take ``F.linear`` on CPU, never oneDNN (see the module
#: docstring): 2**19 keeps 768 x 768 and every larger weight on oneDNN.
ONEDNN_MIN_ELEMENTS = int(os.environ.get("MGPU_CPU_ONEDNN_MIN_ELEMENTS", 2**19))


def _packed_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes oneDNN multiplies reordered here: float32 everywhere, bfloat16 only on CPUs
    with its bfloat16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; a Zen 3 EPYC has neither,
    and there oneDNN refuses to reorder a bfloat16 weight at all)."""
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return (torch.float32, torch.bfloat16)
    return (torch.float32,)


#: Weight dtypes :func:`cpu_packed_weight` reorders for oneDNN.
PACKED_DTYPES = _packed_dtypes()


def _native_float16_gemm() -> bool:
    """Whether ``F.linear`` multiplies float16 with oneDNN's native kernels here (CPUs with
    AVX512-FP16 or AMX-FP16: Sapphire Rapids and later), rather than a generic loop."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _amx_tiles() -> bool:
    """Whether the CPU has AMX tiles, which oneDNN's bfloat16 GEMM (``F.linear``) uses."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


#: ``F.linear`` multiplies float16 natively on this CPU (see :func:`_native_float16_gemm`).
NATIVE_FP16_GEMM = _native_float16_gemm()
#: oneDNN's bfloat16 products use AMX tiles on this CPU (see :func:`_amx_tiles`).
AMX_BF16_GEMM = torch.bfloat16 in PACKED_DTYPES and _amx_tiles()
#: Half-precision weight dtypes with no fast CPU GEMM here, multiplied in float32 blocks from
#: :data:`FP16_UPCAST_MIN_ROWS` rows: float16 where the CPU has no native float16 kernels
#: (:data:`NATIVE_FP16_GEMM`), bfloat16 where oneDNN has no bfloat16 kernels. Measured on a Zen 3
#: EPYC (AVX2), 2 threads, bfloat16 F.linear against the blocked float32 path: 4096 x 1024 x 8
#: rows 5.3 against 3.4 ms, x 32 rows 15.9 against 4.7 ms, 32000 x 1024 x 32 rows 115 against
#: 32 ms (at 4 rows 2.5 against 3.1; one row stays bfloat16). With native float16 kernels
#: (Sapphire Rapids, AVX512-FP16), F.linear against the blocked path at 32 rows: 1534 against
#: 1664 us (4096 x 1024) and 14.0 against 19.6 ms (32000 x 1024).
UPCAST_DTYPES = (
    *(() if NATIVE_FP16_GEMM else (torch.float16,)),
    *(() if torch.bfloat16 in PACKED_DTYPES else (torch.bfloat16,)),
)


#: The skinny kernel of :mod:`mgpu.layers.cpu_kernels` multiplies plain CPU weights by few rows
#: (``MGPU_CPU_SKINNY=0`` in the environment turns it off, for comparisons).
SKINNY = os.environ.get("MGPU_CPU_SKINNY", "1") != "0"


def skinny_native_bfloat16() -> bool:
    """Whether the skinny kernel multiplies bfloat16 rows by bfloat16 weights as they are
    (AVX512-BF16's ``vdpbf16ps``, on CPUs that have it) instead of widening the weight to float32:
    then a plain bfloat16 weight takes it up to :data:`NATIVE_BF16_MAX_ROWS` rows."""
    return SKINNY and _kernel_native_bfloat16()


@functools.cache
def _kernel_native_bfloat16() -> bool:
    kernel = cpu_kernels.kernel()
    return kernel is not None and bool(kernel.skinny_native_bf16())


#: Most rows of x for which a plain bfloat16 weight takes the skinny kernel where it multiplies
#: bfloat16 natively (:func:`skinny_native_bfloat16`) and the CPU has no AMX; beyond, ``F.linear``.
NATIVE_BF16_MAX_ROWS = 32
#: Most rows of x for which a plain float16 weight takes the skinny kernel where ``F.linear``
#: multiplies float16 natively (:data:`NATIVE_FP16_GEMM`). Measured on a 2-core Sapphire Rapids
#: Xeon (AVX512-FP16), 2 threads, skinny against F.linear, microseconds: 4096 x 1024 at 8 rows
#: 470 against 720, at 12 695 against 868, at 16 1073 against 1000, at 32 1669 against 1464;
#: 32000 x 1024 at 12 5405 against 5664, at 16 7875 against 7611, at 32 15530 against 12083.
NATIVE_FP16_SKINNY_MAX_ROWS = 12


def skinny_max_rows(dtype: torch.dtype) -> int:
    """Most rows of x for which a plain CPU weight of ``dtype`` takes the skinny kernel (see the
    module docstring): 32 for the dtypes whose alternative is the blocked float32 path
    (:data:`UPCAST_DTYPES`) and for bfloat16 where the kernel multiplies it natively and the CPU
    has no AMX, 12 for float16 where ``F.linear`` has native float16 kernels, 4 where the
    alternative is a fast float32 or bfloat16 GEMM, 0 for any other dtype.

    With AMX, oneDNN's bfloat16 ``F.linear`` wins from 6 rows: on a 2-core Sapphire Rapids Xeon,
    2 threads, the native skinny path against F.linear on a plain weight, microseconds: 4096 x
    1024 at 4 rows 265 against 368, at 6 400 against 381, at 32 1886 against 720; 32000 x 1024
    (a tied LM head) at 4 rows 2074 against 2877, at 8 4374 against 2870, at 32 17632 against
    4919. Without AMX (a Zen 4 EPYC) the two were even at 32 rows (the module docstring).
    """
    if dtype in UPCAST_DTYPES:
        return 32
    if dtype == torch.bfloat16 and skinny_native_bfloat16() and not AMX_BF16_GEMM:
        return NATIVE_BF16_MAX_ROWS
    if dtype == torch.float16 and NATIVE_FP16_GEMM:
        return NATIVE_FP16_SKINNY_MAX_ROWS
    return 4 if dtype in (torch.float32, torch.bfloat16) else 0


def _onednn_works() -> bool:
    """Whether oneDNN's linear runs here and is not switched off (``MGPU_CPU_ONEDNN=0``).

    Probed once with a tiny product: a build without oneDNN, or one whose oneDNN refuses the
    reorder (some non-x86 builds), keeps ``F.linear``.
    """
    if os.environ.get("MGPU_CPU_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.equal(out, torch.full((1, 2), 2.0)))


#: oneDNN's products on CPU are on (see the module docstring).
ONEDNN = _onednn_works()


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """oneDNN's ``x W^T + b`` (x (..., in), weight plain or reordered (out, in))."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_keep_plain = [False]


@contextlib.contextmanager
def keep_plain_weights() -> Iterator[None]:
    """Models loaded inside this block keep plain weights (:func:`cpu_packed_weight` returns
    None): for ``torch.compile``, which cannot read reordered ones."""
    previous = _keep_plain[0]
    _keep_plain[0] = True
    try:
        yield
    finally:
        _keep_plain[0] = previous


def cpu_packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` (out, in) reordered into oneDNN's layout for :func:`dense_linear`, or None
    where the plain weight is kept (not on CPU, a dtype oneDNN does not multiply fast, oneDNN off,
    a weight smaller than :data:`ONEDNN_MIN_ELEMENTS`, inside :func:`keep_plain_weights`).

    The reordered tensor holds the same values and as many bytes; it has no strides, so only
    :func:`dense_linear` (and ``to_dense()``) can read it.
    """
    if (
        not ONEDNN
        or _keep_plain[0]
        or weight.device.type != "cpu"
        or weight.dtype not in PACKED_DTYPES
        or weight.numel() < ONEDNN_MIN_ELEMENTS
    ):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def pack_module_weight(module: nn.Module) -> None:
    """Replace ``module.weight`` by its reordered copy where :func:`cpu_packed_weight` gives one
    (the linears' and an untied LM head's ``process_weights_after_loading``)."""
    packed = cpu_packed_weight(module.weight)
    if packed is not None:
        module.weight = nn.Parameter(packed, requires_grad=False)


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in) -> (..., out) in x's dtype.

    On CPU: a plain weight with at most :func:`skinny_max_rows` rows of x takes the skinny
    kernel (outside ``torch.compile``'s tracing and autograd's recording); a reordered weight
    (:func:`cpu_packed_weight`) and a plain float32 one of at least
    :data:`ONEDNN_MIN_ELEMENTS` elements (outside ``torch.compile``'s tracing) go through
    oneDNN; float16 (and bfloat16 on CPUs without its kernels, :data:`UPCAST_DTYPES`) with at
    least :data:`FP16_UPCAST_MIN_ROWS` rows multiplies in float32, one cache-sized block of
    weight rows at a time (see the module docstring).
    """
    if weight.is_mkldnn:
        return _onednn_linear(x, weight, bias)
    if weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= skinny_max_rows(weight.dtype):
        out = _skinny_linear(x, weight, bias)
        if out is not None:
            return out
    if weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_ELEMENTS:
        return _plain_float32_linear(x, weight, bias)
    if weight.dtype not in UPCAST_DTYPES or rows < FP16_UPCAST_MIN_ROWS:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    block_rows = max(1, _BLOCK_BYTES // (4 * in_features))
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, block_rows):
        end = min(start + block_rows, out_features)
        block_bias = None if bias is None else bias[start:end].float()
        # A block is a slice of a large weight: oneDNN whatever its size (where it is on).
        out[..., start:end] = _plain_float32_linear(x32, weight[start:end].float(), block_bias)
    return out


def _plain_float32_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A plain float32 weight's product: oneDNN where it is on, outside ``torch.compile``'s
    tracing (Inductor plans ``F.linear`` itself) and autograd's recording (oneDNN's op has no
    backward: its product would silently carry no gradient), else ``F.linear``."""
    if ONEDNN and not torch.compiler.is_compiling() and not cpu_kernels.records_grad(x, weight):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """The product through the CPU kernels' skinny kernel, or None where it cannot run (no
    kernel, ``MGPU_CPU_SKINNY=0``, inside ``torch.compile``'s tracing, autograd recording, a
    weight that is not contiguous)."""
    if not SKINNY or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return None
    kernel = cpu_kernels.kernel_for(x, weight, *([] if bias is None else [bias]))
    if kernel is None:
        return None
    flat = x.reshape(-1, x.shape[-1])  # (rows, in)
    return kernel.skinny_linear(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])
