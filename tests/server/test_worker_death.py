"""A worker killed under load: in-flight requests fail at once with an error, /health turns 503,
new requests get 503, and SIGTERM still stops the server cleanly.

This module has its own TP=2 server, since the test leaves it without a working engine. TP=2 is
the hard case: the surviving rank is blocked in a collective waiting for the dead one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import LONG_MODEL_LEN, ServerProcess, stop_and_check


@pytest.fixture(scope="module")
def doomed_server(model_dir: Path) -> Iterator[ServerProcess]:
    """A TP=2 server that a test will break."""
    server = ServerProcess(
        [
            *("--model", str(model_dir), "--device", "cpu", "--tensor-parallel-size", "2"),
            *("--max-model-len", str(LONG_MODEL_LEN), "--num-gpu-blocks-override", "160"),
        ]
    )
    yield server
    stop_and_check(server)


def test_killed_worker_fails_requests_and_health(doomed_server: ServerProcess) -> None:
    url = doomed_server.url
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and len(health["worker_pids"]) == 2
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    long_request = {
        "model": "tiny-llama",
        "prompt": "The quick brown fox",
        "max_tokens": LONG_MODEL_LEN - 64,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    # One non-streaming request in flight besides the stream.
    outcome: dict[str, BaseException] = {}

    def blocking() -> None:
        try:
            client.completions.create(**long_request)
        except BaseException as exc:
            outcome["error"] = exc

    waiter = threading.Thread(target=blocking)
    waiter.start()
    stream = client.completions.create(**long_request, stream=True)
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    os.kill(health["worker_pids"][1], signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(openai.APIError) as streamed:
        for _ in chunks:
            pass
    assert "engine stopped" in str(streamed.value)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert isinstance(outcome.get("error"), openai.InternalServerError)
    assert outcome["error"].status_code == 503
    assert time.monotonic() - killed_at < 20
    response = httpx.get(f"{url}/health", timeout=10)
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy" and response.json()["error"]
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'mgpu_engine_healthy{model_name="tiny-llama"} 0.0' in metrics
    with pytest.raises(openai.InternalServerError) as refused:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=2)
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "engine_unavailable"
