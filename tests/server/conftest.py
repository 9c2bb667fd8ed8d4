"""Shared pieces of the server tests: a tiny model, a real ``mgpu serve`` process, the references.

Servers run as subprocesses started the way users start them (``python -m mgpu.serve --port 0``),
so the tests cover the command line, start-up and shutdown as well as the HTTP API.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from mgpu.bench.local import LocalServer
from tests.helpers import make_model

#: Context of most test servers: short, so prompts and KV caches stay small.
MAX_MODEL_LEN = 128
#: The TP=2 server's API key (given through MGPU_API_KEY).
API_KEY = "test-key-123"
#: Context of the server whose requests must run long enough to be interrupted.
LONG_MODEL_LEN = 2048
REPO = Path(__file__).resolve().parents[2]


class ServerProcess(LocalServer):
    """``mgpu serve`` as users start it (see :class:`~mgpu.bench.local.LocalServer`), run from
    the repository, with the metrics helpers the tests read.

    Args:
        args: flags after ``python -m mgpu.serve``.
        env: extra environment variables.
        timeout: seconds to wait for the "listening on" line.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 180):
        super().__init__(args, timeout=timeout, env=env, cwd=REPO)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {series: value}, labels stripped (one model per server)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                name = re.sub(r'model_name="[^"]*",?', "", series).replace(",}", "}")
                name = name.replace("{}", "")
                values[name] = float(value)
        return values

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Wait until no request runs or waits; returns the metrics then."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["mgpu_num_requests_running"] == 0 and m["mgpu_num_requests_waiting"] == 0:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"server still busy: {m}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """SIGTERM, then wait; returns the exit status (kills on timeout).

        uvicorn shuts down gracefully and then re-raises the signal, so a clean stop reads -15.
        """
        return super().stop(sig, timeout)


def stop_and_check(server: ServerProcess) -> None:
    """Stop ``server`` with SIGTERM; it must exit cleanly and leave no worker behind."""
    pids = httpx.get(f"{server.url}/health", timeout=10).json()["worker_pids"]
    assert server.stop() in (0, -signal.SIGTERM), server.log
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in pids), "worker processes outlived the server"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML tokenizer: varied greedy text, fast on CPU.

    Its context is long (2048) so that one request can outlast a client that walks away from it.
    """
    path = tmp_path_factory.mktemp("server-model") / "tiny-llama"
    return make_model(path, max_position_embeddings=LONG_MODEL_LEN)


class Reference:
    """The offline engine (``mgpu.LLM``) on the same model: what the server must reproduce.

    Args:
        model_dir: the model.
    """

    def __init__(self, model_dir: Path):
        from mgpu import LLM

        self.llm = LLM(str(model_dir), device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=64)
        self.tokenizer = self.llm.get_tokenizer()

    def complete(self, prompt: str | list[int], max_tokens: int, **params: Any) -> Any:
        """The offline output of one prompt, run alone (greedy unless ``params`` say otherwise)."""
        from mgpu import SamplingParams

        sp = SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, **params})
        return self.llm.generate([prompt], sp, use_tqdm=False)[0]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt the chat template makes of ``messages``."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        """The offline greedy reply to a conversation."""
        return self.complete(self.chat_ids(messages), max_tokens).outputs[0].text


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> Iterator[Reference]:
    """One offline engine for every server test module."""
    ref = Reference(model_dir)
    yield ref
    ref.llm.shutdown()


@pytest.fixture(scope="session")
def server_tp1(model_dir: Path) -> Iterator[ServerProcess]:
    """TP=1, a 24-block KV cache, a 64 KiB body limit, served as "tiny"."""
    server = ServerProcess(
        [
            *("--model", str(model_dir), "--device", "cpu"),
            *("--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "24"),
            *("--max-request-bytes", "65536", "--served-model-name", "tiny"),
        ]
    )
    yield server
    stop_and_check(server)


@pytest.fixture(scope="session")
def server_tp2(model_dir: Path) -> Iterator[ServerProcess]:
    """TP=2 with the API key taken from MGPU_API_KEY and a long context."""
    server = ServerProcess(
        [
            *("--model", str(model_dir), "--device", "cpu", "--tensor-parallel-size", "2"),
            *("--max-model-len", str(LONG_MODEL_LEN), "--num-gpu-blocks-override", "160"),
            *("--served-model-name", "tiny"),
        ],
        env={"MGPU_API_KEY": API_KEY},
    )
    yield server
    stop_and_check(server)
