"""A real Prometheus scrapes a TP=2 ``mgpu serve --device cpu`` with one rank slowed on purpose.

The server runs with ``MGPU_TEST_SLOW_RANK=1:0.05`` (rank 1 sleeps 50 ms in every step) and short
monitor intervals; a load thread keeps it generating. Prometheus (the Debian package's binary,
started here on loopback with a temporary config and data directory) scrapes it every second and
evaluates the shipped alert rules, the imbalance rule's ``for`` shortened to seconds. The tests
read the series back through Prometheus's HTTP API, and check the server's warning, the alert,
the Grafana dashboard's queries and ``mgpu monitor`` against the same server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.server.conftest import ServerProcess, stop_and_check

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install prometheus)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """TP=2 on CPU, rank 1 slowed, monitor sampling every 0.5 s, warning after 2 s."""
    proc = ServerProcess(
        [
            *("--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len", "256"),
            *("--telemetry-interval", "0.5", "--imbalance-window", "3"),
            *("--imbalance-warn-after", "2"),
        ],
        env={"MGPU_TEST_SLOW_RANK": "1:0.05"},
    )
    model = httpx.get(f"{proc.url}/v1/models", timeout=10).json()["data"][0]["id"]
    stop = threading.Event()

    def load() -> None:
        body = {"model": model, "prompt": "hello", "max_tokens": 16, "temperature": 0}
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    http.post(f"{proc.url}/v1/completions", json=body)
                except httpx.HTTPError:
                    time.sleep(0.1)

    load_thread = threading.Thread(target=load, daemon=True, name="load")
    load_thread.start()
    yield proc
    stop.set()
    load_thread.join(timeout=60)
    stop_and_check(proc)


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server scraping ``server`` every second; yields its URL."""
    assert PROMETHEUS is not None
    root = tmp_path_factory.mktemp("prometheus")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "MgpuRankImbalance":
            rule["for"] = "2s"
    (root / "alerts.yml").write_text(yaml.safe_dump(rules))
    target = server.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "mgpu", "static_configs": [{"targets": [target]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (root / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (root / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_for(fn: Any, timeout: float = 60, what: str = "") -> Any:
    """Poll ``fn`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_prometheus_reads_per_device_and_request_series(prometheus: str) -> None:
    def per_rank(name: str) -> dict[str, dict[str, str]]:
        return {r["metric"]["rank"]: r["metric"] for r in _query(prometheus, name)}

    memory = _wait_for(lambda: len(per_rank("mgpu_device_memory_used_bytes")) == 2, what="ranks")
    assert memory
    for name in (
        "mgpu_device_utilization_ratio",
        "mgpu_device_memory_total_bytes",
        "mgpu_device_compute_seconds_total",
        "mgpu_device_communication_seconds_total",
        "mgpu_rank_up",
    ):
        series = per_rank(name)
        assert set(series) == {"0", "1"}, name
        assert all(m["device"] == "cpu" and m["job"] == "mgpu" for m in series.values())
    used = {
        r["metric"]["rank"]: float(r["value"][1])
        for r in _query(prometheus, "mgpu_device_memory_used_bytes")
    }
    assert all(v > 10 * 2**20 for v in used.values())  # each worker holds torch and its shard
    tokens = _wait_for(
        lambda: _query(prometheus, "rate(mgpu_generation_tokens_total[5s]) > 0"), what="tokens"
    )
    assert tokens[0]["metric"]["job"] == "mgpu"
    assert _query(prometheus, "mgpu_time_to_first_token_seconds_count > 0")
    assert _query(prometheus, "mgpu_request_queue_time_seconds_count > 0")
    assert _query(prometheus, "mgpu_inter_token_latency_seconds_count > 0")
    assert _query(prometheus, "mgpu_num_requests_running")


def test_slow_rank_raises_the_ratio_logs_the_warning_and_fires_the_alert(
    server: ServerProcess, prometheus: str
) -> None:
    ratio = _wait_for(
        lambda: _query(prometheus, "mgpu_device_imbalance_ratio > 1.25"), what="imbalance"
    )
    assert float(ratio[0]["value"][1]) > 1.25

    def firing() -> list[dict[str, Any]]:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "MgpuRankImbalance" and a["state"] == "firing"
        ]

    alert = _wait_for(firing, what="the MgpuRankImbalance alert")
    assert alert[0]["labels"]["severity"] == "warning"
    warning = _wait_for(
        lambda: re.search(r"WARNING mgpu.monitor: imbalance ratio .*", server.log), what="warning"
    )
    assert "rank 1 computes" in warning.group(0)
    assert "--pipeline-parallel-size" in warning.group(0)
    # The compute of rank 1 includes its 50 ms sleeps; rank 0 waits for it in collectives.
    comm = {
        r["metric"]["rank"]: float(r["value"][1])
        for r in _query(prometheus, "rate(mgpu_device_communication_seconds_total[5s])")
    }
    compute = {
        r["metric"]["rank"]: float(r["value"][1])
        for r in _query(prometheus, "rate(mgpu_device_compute_seconds_total[5s])")
    }
    assert compute["1"] > compute["0"]
    assert comm["0"] > comm["1"]
    # Rank 0's extra collective time is waiting for rank 1, not moving data: the slow-link rule
    # (on the transfer fraction) stays quiet although most of rank 0's step is in collectives.
    wait = {
        r["metric"]["rank"]: float(r["value"][1])
        for r in _query(prometheus, "rate(mgpu_device_collective_wait_seconds_total[5s])")
    }
    assert wait["0"] > wait["1"] and wait["0"] > 0.5 * comm["0"]
    (transfer,) = _query(prometheus, "mgpu_transfer_fraction")
    assert float(transfer["value"][1]) < 0.5
    assert "interconnect" not in server.log


def test_every_dashboard_metric_is_exported(server: ServerProcess) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "mgpu.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried = {name for e in exprs for name in re.findall(r"\bmgpu_[a-z0-9_]+", e)}
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            exported.add(name)
            if kind == "histogram":
                exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert len(queried) >= 15
    assert queried <= exported, queried - exported
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert any(r.get("repeat") == "rank" for r in rows)  # one row per device and rank


def test_monitor_once_json(server: ServerProcess) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mgpu", "monitor", "--url", server.url, "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    assert [d["rank"] for d in snap["devices"]] == [0, 1]
    for d in snap["devices"]:
        assert d["device"] == "cpu" and 0 <= d["utilization"] <= 1
        assert d["memory_used_bytes"] > 0 and d["memory_total_bytes"] >= d["memory_used_bytes"]
        assert d["compute_seconds"] > 0 and 0 < d["communication_share"] < 1
    assert snap["imbalance_ratio"] >= 1.0
    assert set(snap["requests"]) == {"running", "waiting"}


def _drain_until_exit(pid: int, fd: int, timeout_s: float) -> int:
    """Wait for the child on the pseudo-terminal ``fd`` to exit, reading what it still writes: a
    terminal is always read, and a view that restores the screen on exit would otherwise block on
    a full pty buffer. Returns its wait status; a child still running after ``timeout_s`` is
    killed and the test fails."""
    import select

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if select.select([fd], [], [], 0.2)[0]:
            try:
                os.read(fd, 65536)
            except OSError:  # the child closed the terminal: it is exiting
                return os.waitpid(pid, 0)[1]
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"mgpu monitor did not exit within {timeout_s} s of Ctrl-C")


def test_monitor_live_view_in_a_terminal(server: ServerProcess) -> None:
    """The live view, run in a pseudo-terminal until its first frame, then interrupted."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: the real command, in the terminal
        # Ctrl-C as a shell gives it: whatever this test process set for SIGINT (ignored, or
        # blocked in the forking thread) would otherwise carry over through exec.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.environ.update(COLUMNS="120", LINES="30", TERM="xterm")
        os.execv(sys.executable, [sys.executable, "-m", "mgpu", "monitor", "--url", server.url])
    output = b""
    deadline = time.monotonic() + 60
    try:
        while b"compute | comm" not in output or output.count(b"cpu") < 2:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            try:
                output += os.read(fd, 65536)
            except OSError:
                break
    finally:
        os.kill(pid, signal.SIGINT)  # Ctrl-C: the view exits cleanly
        status = _drain_until_exit(pid, fd, timeout_s=30)
        os.close(fd)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", output.decode(errors="replace"))
    assert "mgpu monitor" in text and "imbalance" in text
    assert "UNEVEN RANKS" in text  # rank 1 is slowed: the warning is highlighted
    assert os.waitstatus_to_exitcode(status) == 0
