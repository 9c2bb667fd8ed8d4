"""What every benchmark shares: its section of docs/benchmarks.md and the machine it ran on."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"


def markers(name: str, device: str) -> tuple[str, str]:
    """The comment lines delimiting benchmark ``name``'s section for ``device``."""
    return f"<!-- {name}_{device}:start -->", f"<!-- {name}_{device}:end -->"


def cpu_name() -> str:
    """The CPU's model name and the vector ISA torch picked (results differ by both: the same
    benchmark ran 2-3x apart on a Zen 3 and an AVX-512 EPYC)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def machine_line(device: str) -> str:
    """One line naming the hardware, torch version and date of a run."""
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        ram = psutil.virtual_memory().total / 2**30
        hardware = f"{psutil.cpu_count()} cores ({cpu_name()}), {ram:.0f} GiB RAM"
    return f"{hardware}, torch {torch.__version__}, run on {time.strftime('%Y-%m-%d')}"


def write_section(text: str, name: str, device: str, doc: Path = BENCHMARKS_DOC) -> None:
    """Replace benchmark ``name``'s section of ``doc`` by ``text`` (appended if absent).

    ``text`` must start and end with the section's markers.
    """
    start, end = markers(name, device)
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in old:
        head, rest = old.split(start, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new)
