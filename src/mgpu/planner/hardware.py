"""The GPU catalogue (``data/gpu_specs.csv``), ``--gpus`` parsing, NVML detection, interconnects.

GPU names are matched by their model number (``4090``, ``a100``, ``h100``) plus qualifiers. A
qualifier the user wrote must be in the catalogue name (``sxm`` matches ``SXM5``), ``Ti``/``Super``
name a different product and must match both ways, and a memory size picks the variant. When
several variants remain (``A100``), the one with the most memory and bandwidth is taken and the plan
says which it assumed.

Memory sizes are GiB: a "24 GB" card holds 24 x 2^30 bytes, which is how GPU memory is sold.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from mgpu.errors import ConfigError

_FILLER = {
    "nvidia",
    "geforce",
    "rtx",
    "amd",
    "instinct",
    "generation",
    "gpu",
    "tesla",
    "card",
    "hbm2",
    "hbm2e",
    "hbm3",
    "hbm3e",
    "gddr6",
    "gddr6x",
    "gddr7",
    "server",
    "graphics",
}
# Qualifiers that name a different product rather than a variant of the same one.
_PRODUCT_QUALIFIERS = {"ti", "super"}
_MEMORY = re.compile(r"^(\d+)(?:gb|g|gib)$")
# Board variants carry digits too (SXM5) but are qualifiers, not model numbers.
_VARIANT = re.compile(r"^(sxm|pcie|oam)\d?$")


#: Catalogue GPUs with HBM memory (the rest of gpu_specs.csv is GDDR).
_HBM_PARTS = ("A100", "H100", "H200", "MI300")


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model from ``gpu_specs.csv`` (None where the file says n/f)."""

    name: str
    memory_gib: float
    bandwidth_gbs: float | None
    tflops: float | None
    tdp_w: float | None
    nvlink_gbs: float | None
    pcie: str
    price_usd: float | None
    source: str

    @property
    def form(self) -> str:
        """consumer, workstation, datacenter-pcie (passive card) or server-board (SXM/OAM)."""
        if "GeForce" in self.name:
            return "consumer"
        if self.name.startswith("RTX"):
            return "workstation"
        if "SXM" in self.name or "MI300X" in self.name:
            return "server-board"
        return "datacenter-pcie"

    @property
    def is_hbm(self) -> bool:
        """Whether the card's memory is HBM (A100, H100, H200, MI300X) rather than GDDR.

        HBM's wide, slower-clocked stacks need more requests in flight to reach their bandwidth
        than GDDR does, so an engine's kernels can reach a different share of it; the speed model
        calibrates the two kinds apart where the measurements allow.
        """
        return any(part in self.name for part in _HBM_PARTS)

    @property
    def hardware_class(self) -> str:
        """The class accuracy is reported by: consumer, workstation, datacenter-gddr (L40S, A40)
        or datacenter-hbm."""
        if self.is_hbm:
            return "datacenter-hbm"
        return "datacenter-gddr" if self.form == "datacenter-pcie" else self.form

    @property
    def default_interconnect(self) -> str:
        """The link a group of these cards has unless told otherwise."""
        if self.form == "server-board":
            return "nvlink"
        return self.pcie


@dataclass(frozen=True)
class Device:
    """One GPU of a plan: its catalogue entry and the memory it really has."""

    spec: GpuSpec
    memory_gib: float

    @property
    def name(self) -> str:
        """Catalogue name."""
        return self.spec.name


def _number(text: str) -> float | None:
    match = re.match(r"\s*([\d.]+)", text.replace(",", ""))
    return float(match.group(1)) if match and not text.strip().startswith("n/f") else None


def _pcie_link(text: str) -> str:
    match = re.search(r"PCIe (\d)\.0( x8)?", text)
    if not match:
        return "pcie4"
    return f"pcie{match.group(1)}" + ("-x8" if match.group(2) else "")


def _nvlink_gbs(text: str) -> float | None:
    """Per-direction bandwidth of the card's GPU-to-GPU link, or None if it has none."""
    lowered = text.lower()
    if not (lowered.startswith(("yes", "nvlink", "infinity"))):
        return None
    match = re.search(r"([\d.]+)\s*GB/s", text)
    if match:
        return float(match.group(1)) / 2  # the file gives the two directions together
    bridge = interconnect_data()["bridge_default_gbs"]
    return float(bridge) / 2


@cache
def interconnect_data() -> dict[str, Any]:
    """``data/interconnects.json``: link rates, all-reduce latencies, the assumed bridge rate."""
    return json.loads(
        resources.files("mgpu.planner").joinpath("data/interconnects.json").read_text()
    )


@cache
def gpu_catalogue() -> tuple[GpuSpec, ...]:
    """Every GPU of ``data/gpu_specs.csv``."""
    text = resources.files("mgpu.planner").joinpath("data/gpu_specs.csv").read_text()
    specs = []
    for row in csv.DictReader(text.splitlines()):
        specs.append(
            GpuSpec(
                name=row["gpu"],
                memory_gib=float(row["vram_gb"]),
                bandwidth_gbs=_number(row["mem_bandwidth_gbs"]),
                tflops=_number(row["dense_fp16_bf16_tensor_tflops"]),
                tdp_w=_number(row["tdp_w"]),
                nvlink_gbs=_nvlink_gbs(row["nvlink"]),
                pcie=_pcie_link(row["pcie"]),
                price_usd=_number(row["price_usd"]),
                source=row["source"],
            )
        )
    return tuple(specs)


def _tokens(text: str) -> list[str]:
    lowered = text.lower().replace("-", " ").replace("_", " ").replace("/", " ")
    tokens = []
    for token in lowered.split():
        memory = _MEMORY.match(token)
        tokens.append(f"{memory.group(1)}gb" if memory else token)
    return [t for t in tokens if t not in _FILLER]


def _is_model_token(token: str) -> bool:
    return bool(re.search(r"\d", token)) and not _MEMORY.match(token) and not _VARIANT.match(token)


def _matches(query: list[str], spec: GpuSpec) -> bool:
    names = _tokens(spec.name)
    if [t for t in query if _is_model_token(t)] != [t for t in names if _is_model_token(t)]:
        return False
    for token in query:
        if _MEMORY.match(token):
            if float(token[:-2]) != spec.memory_gib:
                return False
        elif not _is_model_token(token) and not any(
            n.startswith(token) or token.startswith(n) for n in names
        ):
            return False
    return all(t in query for t in names if t in _PRODUCT_QUALIFIERS)


def find_gpu(text: str) -> tuple[GpuSpec, str | None]:
    """Find a GPU by the name people use (``RTX 4090``, ``4090``, ``H100-SXM``, ``A100 PCIe 80GB``).

    Args:
        text: one GPU name, without a count.

    Returns:
        The spec, and a note when the name was ambiguous and a variant was assumed.

    Raises:
        ConfigError: when nothing matches, listing the closest catalogue names.
    """
    query = _tokens(text)
    candidates = [s for s in gpu_catalogue() if _matches(query, s)]
    if not candidates:
        names = [s.name for s in gpu_catalogue()]
        model = [t for t in query if _is_model_token(t)]
        # Same model number first (4060 -> RTX 4060 Ti 16GB), then spelling similarity.
        same = [s.name for s in gpu_catalogue() if model and model[0] in _tokens(s.name)]
        short = {re.sub(r"^(GeForce |AMD Instinct )", "", n).lower(): n for n in names}
        close = difflib.get_close_matches(text.strip().lower(), list(short), n=3, cutoff=0.3)
        suggestions = list(dict.fromkeys([*same, *(short[c] for c in close)]))[:3]
        hint = f" Closest: {', '.join(suggestions)}." if suggestions else ""
        raise ConfigError(f"unknown GPU {text!r}.{hint} Known GPUs: {', '.join(names)}.")
    best = max(candidates, key=lambda s: (s.memory_gib, s.bandwidth_gbs or 0.0))
    note = None
    if len(candidates) > 1:
        others = ", ".join(s.name for s in candidates if s is not best)
        note = (
            f"{text.strip()!r} read as {best.name} (other variants: {others}); name one to choose"
        )
    return best, note


def parse_gpus(text: str) -> tuple[list[Device], list[str]]:
    """Parse ``--gpus``: ``2x RTX 4090 24GB``, ``2x4090``, ``4090,3090``, ``8xH100-SXM``.

    Args:
        text: comma- or plus-separated groups, each an optional ``<count>x`` and a GPU name.

    Returns:
        One device per GPU, and notes on ambiguous names.
    """
    devices: list[Device] = []
    notes: list[str] = []
    for part in re.split(r"[,+]", text):
        if not part.strip():
            continue
        match = re.match(r"^\s*(\d+)\s*[x×*]\s*(.+)$", part, flags=re.IGNORECASE)
        count, name = (int(match.group(1)), match.group(2)) if match else (1, part)
        if count < 1:
            raise ConfigError(f"--gpus: a group needs at least one GPU, got {part.strip()!r}")
        spec, note = find_gpu(name)
        if note and note not in notes:
            notes.append(note)
        devices.extend(Device(spec, spec.memory_gib) for _ in range(count))
    if not devices:
        raise ConfigError("--gpus is empty; write e.g. --gpus '2x RTX 4090'")
    return devices, notes


def detect_gpus() -> list[Device]:
    """The NVIDIA GPUs of this machine through NVML, or an empty list without NVML or GPUs.

    Uses ``nvidia-ml-py`` (optional, ``pip install mgpu[gpu]``). A GPU missing from the catalogue
    keeps its real memory but has no bandwidth, so the plan can size memory but not predict speed.
    """
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory_gib = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            try:
                spec, _ = find_gpu(name)
            except ConfigError:
                spec = GpuSpec(
                    name, round(memory_gib), None, None, None, None, "pcie4", None, "NVML"
                )
            devices.append(Device(spec, memory_gib))
        return devices
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class Interconnect:
    """The link between the GPUs of a plan."""

    name: str
    bandwidth_gbs: float
    latency_base_us: float
    latency_per_gpu_us: float

    def allreduce_seconds(self, num_gpus: int, num_bytes: float) -> float:
        """Time of one ring all-reduce of ``num_bytes`` over ``num_gpus`` GPUs.

        Args:
            num_gpus: participants.
            num_bytes: size of the reduced tensor.
        """
        if num_gpus <= 1:
            return 0.0
        latency = (self.latency_base_us + self.latency_per_gpu_us * (num_gpus - 1)) * 1e-6
        moved = 2 * (num_gpus - 1) / num_gpus * num_bytes
        return latency + moved / (self.bandwidth_gbs * 1e9)

    def alltoall_seconds(self, num_gpus: int, num_bytes: float) -> float:
        """Time of one all-to-all in which every GPU sends ``num_bytes`` spread over all GPUs.

        Each GPU keeps its own share and sends the other ``(n - 1) / n``; the links run in
        parallel, so the time is one GPU's traffic at link bandwidth plus the collective's latency.

        Args:
            num_gpus: participants.
            num_bytes: what one GPU dispatches (its tokens' copies for their experts).
        """
        if num_gpus <= 1:
            return 0.0
        latency = (self.latency_base_us + self.latency_per_gpu_us * (num_gpus - 1)) * 1e-6
        return latency + (num_gpus - 1) / num_gpus * num_bytes / (self.bandwidth_gbs * 1e9)

    def transfer_seconds(self, num_bytes: float) -> float:
        """Time to send ``num_bytes`` from one GPU to the next (a pipeline hop).

        Args:
            num_bytes: the activations handed over.
        """
        return self.latency_base_us * 1e-6 + num_bytes / (self.bandwidth_gbs * 1e9)


INTERCONNECTS = ("pcie3", "pcie4", "pcie4-x8", "pcie5", "nvlink")


def make_interconnect(name: str | None, devices: list[Device]) -> Interconnect:
    """Build the interconnect for ``--interconnect`` (or the devices' default when None).

    Args:
        name: pcie3, pcie4, pcie4-x8, pcie5, nvlink, or None.
        devices: the plan's GPUs; NVLink bandwidth comes from their spec.

    Raises:
        ConfigError: for an unknown name, or NVLink on cards that have none.
    """
    data = interconnect_data()
    pcie_rates = {link["name"]: link["bandwidth_gbs"] for link in data["links"]}
    if name is None:
        links = {d.spec.default_interconnect for d in devices}
        if len(links) > 1:
            # NVLink only joins boards of one kind; mixed cards talk over the slowest PCIe link.
            links = {d.spec.pcie for d in devices}
        name = "nvlink" if links == {"nvlink"} else min(links, key=lambda n: pcie_rates[n])
    if name not in INTERCONNECTS:
        close = difflib.get_close_matches(name, INTERCONNECTS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"unknown --interconnect {name!r}.{hint} Use one of {', '.join(INTERCONNECTS)}."
        )
    fraction = float(data["effective_fraction"])
    if name == "nvlink":
        rates = [d.spec.nvlink_gbs for d in devices]
        if any(r is None for r in rates):
            lacking = sorted({d.name for d in devices if d.spec.nvlink_gbs is None})
            raise ConfigError(
                f"--interconnect nvlink: {', '.join(lacking)} has no NVLink; use pcie4 or pcie5"
            )
        bandwidth = min(r for r in rates if r is not None)
        latency = data["latency"]["nvlink"]
    else:
        bandwidth = pcie_rates[name]
        latency = data["latency"]["pcie"]
    return Interconnect(
        name=name,
        bandwidth_gbs=bandwidth * fraction,
        latency_base_us=float(latency["latency_base_us"]),
        latency_per_gpu_us=float(latency["latency_per_gpu_us"]),
    )
