"""``mgpu bench`` against servers: a real ``mgpu serve`` on the demo model, and a faulty one.

The faulty server answers, in turn, a good stream, an HTTP 500, a stream cut off mid-way (the
connection dropped before ``[DONE]``) and a stream carrying an ``error`` event; the run must count
each failure and still finish.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import matplotlib.image
import pytest

from mgpu.bench.local import LocalServer
from mgpu.bench.report import LATENCY_KEYS, LEVEL_KEYS, SCHEMA, STAT_KEYS
from mgpu.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" in line:
            series, value = line.rsplit(" ", 1)
            values[series.split("{")[0]] = float(value)
    return values


@pytest.fixture(scope="module")
def demo_server() -> Iterator[LocalServer]:
    """``mgpu serve --device cpu`` on the bundled demo model, started as a user would."""
    server = LocalServer(["--device", "cpu", "--max-model-len", "256"], timeout=240)
    yield server
    server.stop()


def test_bench_against_mgpu_serve(demo_server: LocalServer, tmp_path: Path) -> None:
    before = _metrics(demo_server.url)
    out = tmp_path / "run.json"
    argv = ["bench", "--url", demo_server.url, "--concurrency", "1,4", "--num-prompts", "8"]
    argv += ["--prompt-len", "4-12", "--output-len", "6", "--warmup", "0", "--no-progress"]
    argv += ["--json", str(out), "--csv", str(tmp_path / "run.csv")]
    assert main(argv) == 0
    after = _metrics(demo_server.url)
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and set(doc) == {"schema", "meta", "levels"}
    assert doc["meta"]["model"] == "demo" or doc["meta"]["model"]
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4]
    for lv in doc["levels"]:
        assert set(lv) == {*LEVEL_KEYS, *LATENCY_KEYS, "error_kinds"}
        assert (lv["completed"], lv["errors"], lv["error_kinds"]) == (8, 0, {})
        # ignore_eos: every request gets all 6 tokens, and the usage chunks say so.
        assert lv["total_output_tokens"] == 8 * 6
        assert lv["total_prompt_tokens"] >= 8 * 4
        for key in LATENCY_KEYS:
            stats = lv[key]
            assert set(stats) == set(STAT_KEYS)
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
        assert lv["ttft_s"]["p99"] <= lv["e2e_s"]["p99"]
        assert lv["output_tokens_per_s"] > 0 and lv["requests_per_s"] > 0
    # Tokens the bench counted are the tokens the server generated.
    generated = after["mgpu_generation_tokens_total"] - before["mgpu_generation_tokens_total"]
    assert generated == sum(lv["total_output_tokens"] for lv in doc["levels"])
    rows = (tmp_path / "run.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].split(",")[1] == "concurrency"


def test_shared_prefix_hits_the_prefix_cache(demo_server: LocalServer) -> None:
    before = _metrics(demo_server.url)
    argv = ["bench", "--url", demo_server.url, "--concurrency", "1", "--num-prompts", "3"]
    argv += ["--shared-prefix-words", "64", "--prompt-len", "4", "--output-len", "2"]
    assert main([*argv, "--warmup", "0", "--no-progress"]) == 0
    after = _metrics(demo_server.url)
    hits = after["mgpu_prefix_cache_hits_total"] - before["mgpu_prefix_cache_hits_total"]
    queries = after["mgpu_prefix_cache_queries_total"] - before["mgpu_prefix_cache_queries_total"]
    assert queries >= 3 * 64 and hits >= 2 * 48  # the second and third requests reuse the prefix
    assert hits % 16 == 0 and hits < queries


def test_plot_and_compare_write_a_png(
    demo_server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--url", demo_server.url, "--concurrency", "1,2", "--num-prompts", "2"]
    argv += ["--prompt-len", "4", "--output-len", "3", "--no-progress", "--endpoint", "chat"]
    assert main([*argv, "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(tmp_path / "a.png").shape[2] in (3, 4)
    doc = json.loads((tmp_path / "a.json").read_text())
    assert all(lv["errors"] == 0 and lv["total_output_tokens"] == 6 for lv in doc["levels"])
    (tmp_path / "b.json").write_text(json.dumps(doc))
    capsys.readouterr()
    compare = ["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main([*compare, "--plot", str(tmp_path / "ab.png")]) == 0
    assert "(1.00x)" in capsys.readouterr().out
    assert (tmp_path / "ab.png").read_bytes()[:8] == PNG_MAGIC


class FaultyServer:
    """An HTTP/1.1 server on a free port whose n-th request gets behaviour ``n % 4``: a good
    three-token stream, HTTP 500, a stream dropped before ``[DONE]``, an in-stream error event."""

    def __init__(self) -> None:
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = int(re.search(r"content-length: (\d+)", head, re.I).group(1))
        await reader.readexactly(length)
        kind, self.count = self.count % 4, self.count + 1

        def event(data: object) -> bytes:
            text = f"data: {json.dumps(data)}\n\n".encode()
            return f"{len(text):x}\r\n".encode() + text + b"\r\n"

        def token(text: str) -> bytes:
            return event({"choices": [{"index": 0, "text": text}]})

        if kind == 1:
            body = b'{"error": "boom"}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json")
            writer.write(f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            writer.write(body)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
            writer.write(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            writer.write(token(" a"))
            await writer.drain()
            await asyncio.sleep(0.01)
            if kind == 0:
                writer.write(token(" b") + token(" c"))
                usage = {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
                writer.write(event({"choices": [], "usage": usage}))
                text = b"data: [DONE]\n\n"
                writer.write(f"{len(text):x}\r\n".encode() + text + b"\r\n0\r\n\r\n")
            elif kind == 3:
                writer.write(event({"error": {"message": "NaN in logits", "code": 500}}))
                writer.write(b"0\r\n\r\n")
            # kind 2: close with the chunked body unfinished
        await writer.drain()
        writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_errors_are_counted_and_the_run_finishes(tmp_path: Path) -> None:
    server = FaultyServer()
    try:
        out = tmp_path / "faulty.json"
        argv = ["bench", "--url", server.url, "--model", "m", "--concurrency", "1,3"]
        argv += ["--num-prompts", "8", "--warmup", "0", "--no-progress", "--json", str(out)]
        assert main(argv) == 0
    finally:
        server.stop()
    assert server.count == 16
    for lv in json.loads(out.read_text())["levels"]:
        assert (lv["completed"], lv["errors"]) == (2, 6)
        assert lv["error_kinds"] == {
            "HTTP 500": 2,
            "RemoteProtocolError": 2,
            "stream error: NaN in logits": 2,
        }
        assert lv["total_output_tokens"] == 2 * 3 and lv["total_prompt_tokens"] == 2 * 4
        assert lv["ttft_s"]["p50"] > 0


def test_request_rate_level_against_the_faulty_server() -> None:
    server = FaultyServer()
    try:
        argv = ["bench", "--url", server.url, "--model", "m", "--request-rate", "200"]
        argv += ["--num-prompts", "4", "--warmup", "0", "--no-progress"]
        assert main(argv) == 0
    finally:
        server.stop()
    assert server.count == 4


def test_local_sweep_starts_a_server_per_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--local", "--sweep", "max-num-seqs=1,4", "--concurrency", "1,4"]
    argv += ["--serve-args", "--device cpu --max-model-len 128", "--num-prompts", "4"]
    argv += ["--prompt-len", "4", "--output-len", "4", "--no-progress", "--json"]
    assert main([*argv, str(tmp_path / "sweep.json")]) == 0
    out = capsys.readouterr().out
    assert "max-num-seqs=4 against max-num-seqs=1: " in out
    for label in ("max-num-seqs=1", "max-num-seqs=4"):
        doc = json.loads((tmp_path / f"sweep-{label}.json").read_text())
        assert doc["meta"]["label"] == label
        assert [lv["total_output_tokens"] for lv in doc["levels"]] == [16, 16]
