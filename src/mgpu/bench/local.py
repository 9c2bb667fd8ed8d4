"""``mgpu bench --local --sweep tp=1,2``: start ``mgpu serve`` once per layout, load each the same
way, and say whether the larger layout pays.

Each server is ``python -m mgpu.serve --port 0`` (a free port, read back from its "listening on"
line) with the sweep's flags and the user's ``--serve-args``; it is stopped before the next starts,
so layouts never share the cores they are measured on.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mgpu.errors import ConfigError, MgpuError

#: Short sweep keys and the ``mgpu serve`` flags they stand for (any other key is ``--key``).
SWEEP_ALIASES = {
    "tp": "--tensor-parallel-size",
    "pp": "--pipeline-parallel-size",
}


def parse_sweeps(specs: list[str]) -> list[list[tuple[str, str]]]:
    """Every combination of ``KEY=V1,V2`` specs, as (flag, value) lists, first key slowest.

    Args:
        specs: e.g. ``["tp=1,2"]`` or ``["tp=1,2", "max-num-seqs=16,64"]``.
    """
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep takes KEY=V1,V2, got {spec!r}")
        flag = SWEEP_ALIASES.get(key, "--" + key.removeprefix("--").replace("_", "-"))
        axes.append([(flag, v) for v in values.split(",") if v])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def layout_label(flags: list[tuple[str, str]]) -> str:
    """``tp=2`` style label of a sweep point."""
    names = {v: k for k, v in SWEEP_ALIASES.items()}
    return ",".join(f"{names.get(f, f.removeprefix('--'))}={v}" for f, v in flags) or "default"


class LocalServer:
    """An ``mgpu serve`` subprocess on a free loopback port, ready once it prints its URL.

    The one start-and-wait of ``mgpu bench --local`` and of the server tests: the process is
    ``python -m mgpu.serve --port 0 ARGS``, and :attr:`url` is read from its "listening on" line.

    Args:
        args: flags after ``python -m mgpu.serve``.
        timeout: seconds to wait for it to listen.
        env: extra environment variables.
        cwd: its working directory (None: this process's).
    """

    def __init__(
        self,
        args: list[str],
        timeout: float = 600.0,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ):
        self.lines: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mgpu.serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or not self.url:
            self.stop()
            tail = "".join(self.lines[-30:])
            raise MgpuError(f"mgpu serve {shlex.join(args)} did not start:\n{tail}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # it exited

    @property
    def log(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Send ``sig`` (SIGINT: a clean shutdown of the workers), SIGKILL after ``timeout`` s.

        Returns:
            The exit status (negative: the signal that ended it).
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def local_server(args: list[str]) -> Iterator[LocalServer]:
    """A started :class:`LocalServer`, stopped on exit."""
    server = LocalServer(args)
    try:
        yield server
    finally:
        server.stop()


def served_model(url: str, timeout: float = 30.0) -> str:
    """The first model id ``GET /v1/models`` lists."""
    import httpx

    data = httpx.get(url.rstrip("/") + "/v1/models", timeout=timeout).json()
    return data["data"][0]["id"]


def verdict(docs: list[tuple[str, dict[str, Any]]]) -> str:
    """One paragraph answering "is the larger layout worth it here?" from a sweep's runs.

    The first run is the baseline. At the highest load, a layout pays when it gives more output
    tokens/s; at one client (or the lowest load), when its inter-token latency is lower. Both are
    reported with their ratios so the reader can weigh them.

    Args:
        docs: (label, document) pairs of the sweep, baseline first.
    """
    base_label, base = docs[0]
    out = []
    for label, doc in docs[1:]:
        top_b, top_o = base["levels"][-1], doc["levels"][-1]
        low_b, low_o = base["levels"][0], doc["levels"][0]
        tput = top_o["output_tokens_per_s"] / max(top_b["output_tokens_per_s"], 1e-9)
        itl_b, itl_o = low_b["itl_s"]["p50"], low_o["itl_s"]["p50"]
        speed = itl_b / itl_o if itl_b and itl_o else None
        gains = []
        if tput > 1.05:
            gains.append("throughput")
        if speed is not None and speed > 1.05:
            gains.append("single-stream speed")
        answer = "yes, for " + " and ".join(gains) if gains else "no"
        speed_text = f"{speed:.2f}x" if speed is not None else "n/a"
        out.append(
            f"{label} against {base_label}: {answer}. At the highest load "
            f"({_name(top_o)}) it gives {tput:.2f}x the output tokens/s; at the lowest "
            f"({_name(low_o)}) {speed_text} the decode speed (inter-token latency p50 "
            f"{_ms(itl_b)} -> {_ms(itl_o)} ms)."
        )
    return "\n".join(out)


def _name(level: dict[str, Any]) -> str:
    from mgpu.bench.report import level_name

    return level_name(level)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"
