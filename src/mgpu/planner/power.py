"""Power supply and cooling for a set of GPUs.

PSU rating = (sum of GPU TDPs + CPU and platform) x headroom, rounded up to a size that is sold.
The headroom covers the millisecond power spikes of modern GPUs, which exceed TDP. With 250 W for
the CPU and platform and 20% headroom the formula gives 850 W for one RTX 4090 and 1,000 W for one
RTX 5090, the system-power figures NVIDIA publishes for those cards, which is the check on both
constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mgpu.planner.hardware import Device

CPU_PLATFORM_W = 250
HEADROOM = 1.2
PSU_SIZES_W = (550, 650, 750, 850, 1000, 1200, 1300, 1500, 1600, 2000, 2400, 2800, 3200)
#: Beyond this a single PSU on a 120 V / 15 A circuit is no longer possible.
SINGLE_CIRCUIT_W = 1600


@dataclass(frozen=True)
class PowerPlan:
    """What the GPUs draw and what to buy."""

    gpu_watts: float | None
    system_watts: float | None
    psu_watts: int | None
    notes: tuple[str, ...]


def power_plan(devices: list[Device]) -> PowerPlan:
    """Power supply and cooling advice for ``devices``.

    Args:
        devices: the GPUs that will run.
    """
    tdps = [d.spec.tdp_w for d in devices]
    forms = {d.spec.form for d in devices}
    notes: list[str] = []
    if any(t is None for t in tdps):
        lacking = sorted({d.name for d in devices if d.spec.tdp_w is None})
        notes.append(f"No citable TDP for {', '.join(lacking)}: size the PSU from its spec sheet.")
        return PowerPlan(None, None, None, tuple(notes + _cooling(devices, forms, None)))
    gpu_w = float(sum(t for t in tdps if t is not None))
    system_w = gpu_w + CPU_PLATFORM_W
    needed = system_w * HEADROOM
    psu = next((size for size in PSU_SIZES_W if size >= needed), int(math.ceil(needed / 100) * 100))
    if "server-board" in forms:
        notes.append(
            "SXM/OAM boards come inside servers with their own redundant supplies; the PSU figure "
            "is the load the server must carry."
        )
    elif psu > SINGLE_CIRCUIT_W:
        notes.append(
            f"{psu} W is beyond one 120 V / 15 A circuit: use a 230 V supply, two PSUs on separate "
            "circuits, or power-limit the GPUs (nvidia-smi -pl)."
        )
    return PowerPlan(gpu_w, system_w, psu, tuple(notes + _cooling(devices, forms, system_w)))


def _cooling(devices: list[Device], forms: set[str], system_w: float | None) -> list[str]:
    notes = []
    if system_w is not None:
        notes.append(
            f"Under load the machine turns about {system_w:,.0f} W into heat "
            f"({system_w * 3.412:,.0f} BTU/h): plan room ventilation or air conditioning."
        )
    if "consumer" in forms and len(devices) > 1:
        notes.append(
            "Open-air GeForce coolers recirculate each other's heat: leave an empty slot between "
            "cards, use riser cables or blower/water-cooled models, and give the case strong "
            "front-to-back airflow."
        )
    if any(d.spec.tdp_w and d.spec.tdp_w >= 450 and d.spec.form == "consumer" for d in devices):
        notes.append("Give each 450 W+ card its own 12V-2x6 (12VHPWR) cable, fully seated.")
    if "datacenter-pcie" in forms:
        notes.append(
            "Data-centre PCIe cards are passively cooled: they need a server chassis with "
            "high-static-pressure fans and overheat in a desktop case."
        )
    if "workstation" in forms and len(devices) > 1:
        notes.append("Workstation cards use blower coolers and can sit in adjacent slots.")
    return notes
