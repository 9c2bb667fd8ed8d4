"""mgpu's compiled CPU kernels (``csrc/``): paged decode attention, skinny products, norms, RoPE.

- **Paged decode attention** (``paged_decode_cpu.cpp``). PyTorch has no matmul that follows a
  block table, so the plain path (:meth:`PagedAttention.gather` and two batched matmuls) copies
  every decoding sequence's blocks out of the cache for every layer and then reads the copy. On
  CPU that copy was a fifth of a one-sequence decode step. The kernel walks each sequence's block
  table itself (one task per sequence and KV head, float32 scores and softmax), so each key and
  value is read once and only the output is written.
- **Skinny products** (``skinny_linear_cpu.cpp``): ``x W^T + b`` for the few rows of a decode
  step, the weight streamed once from memory by all threads in contiguous ranges, converted to
  float32 in registers (float32, bfloat16 and float16 weights), or, for bfloat16 rows by a
  bfloat16 weight on CPUs with AVX512-BF16, multiplied as bfloat16 pairs without the widening.
  :mod:`mgpu.layers.matmul` says when it is used and what it replaced.
- **RMSNorm with its residual add** (``rms_norm_cpu.cpp``) and **rotary embedding**
  (``rotary_cpu.cpp``): one call each instead of five to seven operators
  (:mod:`mgpu.layers.norm`, :mod:`mgpu.layers.rotary`).

All are compiled on first use, as one extension, through ``torch.utils.cpp_extension`` with the
machine's C++ compiler and ninja (the ``ninja`` wheel, a dependency, where none is installed),
with ``-march=native`` since it is built where it runs, and cached under
``~/.cache/torch_extensions``: a machine pays the 30-60 s build once (``make install`` builds it;
otherwise the engine builds it before starting its workers). Without a compiler, or with
``MGPU_CPU_KERNELS=0`` in the environment, decode attention, the products, the norms and the
rotary embedding keep the PyTorch paths, which compute the same results (tests/unit/ has
test_attention.py, test_dense_linear.py, test_norm.py and test_rotary.py running both).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
#: The extension's sources, compiled together into one module.
_NAMES = (
    "paged_decode_cpu.cpp",
    "skinny_linear_cpu.cpp",
    "rms_norm_cpu.cpp",
    "rotary_cpu.cpp",
    "bindings.cpp",
)
SOURCES = [_CSRC / name for name in _NAMES]
#: Headers the sources include: torch rebuilds on a change of the sources or the flags, not of
#: a header, so their digest goes into the flags (:func:`_header_digest`).
HEADERS = [_CSRC / "vec.h"]
#: The extension's name; torch rebuilds it by itself when the source or the flags change. It
#: names the CPU's vector ISA too: a ``-march=native`` build from an AVX-512 machine must not be
#: loaded from a shared home directory on an AVX2 one.
NAME = f"mgpu_cpu_kernels_{torch.backends.cpu.get_cpu_capability().lower()}"


#: A build lock older than this is left by a process killed while building (a build takes about a
#: minute): torch would wait on it forever, so it is removed.
STALE_LOCK_S = 600.0


def clear_stale_lock(build_dir: Path) -> bool:
    """Remove ``build_dir/lock`` if it is older than :data:`STALE_LOCK_S`; True if removed.

    torch's extension build takes that file while it compiles (and every process that loads the
    extension takes it briefly); a worker killed meanwhile leaves it behind, and every later
    start would then hang in torch's wait for it, with no message.
    """
    lock = build_dir / "lock"
    try:
        if time.time() - lock.stat().st_mtime < STALE_LOCK_S:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    log.warning("removed a stale build lock of the CPU kernels: %s", lock)
    return True


#: ``MGPU_CPU_KERNELS=0`` in the environment (read once, at import: every decode step asks
#: :func:`kernel_for` about a hundred times, and reading the environment each time cost 1.6 us of
#: its 4.9) turns the kernels off.
ENABLED = os.environ.get("MGPU_CPU_KERNELS", "1") != "0"


def kernel() -> ModuleType | None:
    """The compiled kernel module (built on the first call of a machine), or None when
    ``MGPU_CPU_KERNELS=0`` turned it off (:data:`ENABLED`) or it cannot be built (the reason is
    logged once)."""
    return _build() if ENABLED else None


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on these tensors (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kernel_for(*tensors: torch.Tensor) -> ModuleType | None:
    """:func:`kernel` where its functions may stand in for the PyTorch form on these tensors: all
    on CPU, outside ``torch.compile``'s tracing (which cannot trace them; Inductor fuses the
    PyTorch form itself) and autograd's recording (they have no backward); else None.

    Called for every product, norm, rotary and attention call of a CPU step (about a hundred a
    step for a 12-layer model), so the device check is a plain loop: 1.0 us a call, where a
    generator expression and reading the environment each time had made it 4.9.
    """
    if not ENABLED or torch.compiler.is_compiling() or records_grad(*tensors):
        return None
    for t in tensors:
        if not t.is_cpu:
            return None
    return _build()


def _header_digest() -> str:
    """A short digest of :data:`HEADERS`' contents."""
    digest = hashlib.sha256()
    for header in HEADERS:
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import get_default_build_root
        from torch.utils.cpp_extension import load as load_extension

        if shutil.which("ninja") is None:  # torch builds with ninja; the wheel has the binary
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
        clear_stale_lock(root / NAME)
        if not (root / NAME / f"{NAME}.so").exists():
            log.info("building the CPU kernels (once per machine, about a minute)")
        return load_extension(
            name=NAME,
            sources=[str(source) for source in SOURCES],
            # at::parallel_for is OpenMP inlined from ATen's headers: without -fopenmp it runs
            # on one thread. The libgomp it needs is the one torch has already loaded (same
            # soname), so the kernel shares torch's thread pool and wait policy. -ffast-math
            # lets the dot products and exp vectorise; the scores have no infinities or NaNs.
            extra_cflags=[
                "-O3",
                "-march=native",
                "-ffast-math",
                "-fopenmp",
                f"-DMGPU_HEADERS_DIGEST={_header_digest()}",
            ],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers, a failed build: keep the PyTorch path
        log.warning(
            "CPU kernels unavailable (%s: %s); decode attention gathers the cache "
            "instead and decode products take PyTorch's kernels (slower). Install a C++ "
            "compiler (g++) to build them, or set MGPU_CPU_KERNELS=0 to silence this.",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
