"""vLLM's command line on ``mgpu serve``, ``/tokenize``, ``/v1/layout``, ``--dry-run``, two nodes.

The servers are real ``python -m mgpu.serve`` processes (``tests.server.conftest.ServerProcess``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.server.conftest import ServerProcess

VLLM_FLAGS = [
    "--trust-remote-code",
    "--seed",
    "--enforce-eager",
    "--chat-template",
    "--tokenizer",
    "--disable-log-requests",
    "--disable-log-stats",
    "--uvicorn-log-level",
    "--swap-space",
    "--kv-cache-dtype",
    "--enable-prefix-caching",
    "--quantization",
]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mgpu", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_vllm_flags() -> None:
    done = _run("serve", "--help")
    assert done.returncode == 0
    for flag in VLLM_FLAGS:
        assert flag in done.stdout, flag
    assert "MODEL" in done.stdout


def test_trust_remote_code_is_refused(tiny_llama: Path) -> None:
    done = _run("serve", str(tiny_llama), "--trust-remote-code", "--dry-run")
    assert done.returncode == 2
    assert "never runs code" in done.stderr


def test_dry_run_prints_the_ranks_without_starting(tiny_llama: Path) -> None:
    done = _run("serve", str(tiny_llama), "-tp", "2", "-pp", "1", "--dry-run", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(r[3:5] == ["[0,", "3)"] for r in rows)


def test_vllm_command_line_serves(tiny_llama: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    args = [str(tiny_llama), "--device", "cpu", "--dtype", "float32", "-pp", "2"]
    args += ["--num-gpu-blocks-override", "32", "--max-model-len", "128", "--seed", "0"]
    args += ["--enforce-eager", "--chat-template", str(template), "--tokenizer", str(tiny_llama)]
    args += ["--disable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "warning"]
    args += ["--swap-space", "4", "--kv-cache-dtype", "auto", "--enable-prefix-caching"]
    server = ServerProcess(args)
    try:
        ignored = [line for line in server.lines if "ignored:" in line]
        assert len(ignored) == 1
        for flag in ("--seed", "--swap-space"):
            assert flag in ignored[0]
        assert "--enforce-eager" not in ignored[0]  # accepted and acted on (no CUDA graphs)
        hf_tok = AutoTokenizer.from_pretrained(tiny_llama)
        tok = httpx.post(f"{server.url}/tokenize", json={"prompt": "The quick brown fox"}).json()
        assert tok["tokens"] == hf_tok("The quick brown fox").input_ids
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 128
        chat = httpx.post(
            f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.json()["tokens"] == hf_tok("[hi]").input_ids  # the --chat-template's rendering
        text = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()
        assert text["prompt"] == "The quick brown fox"
        assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}).status_code == 400
        rows = httpx.get(f"{server.url}/v1/layout").json()["data"]
        assert [r["layers"] for r in rows] == [[0, 2], [2, 3]]
        for row in rows:
            assert set(row) == {
                "rank",
                "node",
                "device",
                "layers",
                "param_bytes",
                "predicted_param_bytes",
                "kv_blocks",
            }
            assert row["kv_blocks"] == 32
            assert (
                abs(row["param_bytes"] - row["predicted_param_bytes"]) <= 0.02 * row["param_bytes"]
            )
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(tiny_llama: Path) -> None:
    """A TP=2 server whose rank 1 is started by a second ``mgpu serve --node-rank 1``."""
    port = _free_port()
    common = [str(tiny_llama), "-tp", "2", "--device", "cpu", "--dtype", "float32"]
    common += ["--num-gpu-blocks-override", "32", "--max-model-len", "128"]
    nodes = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    second = subprocess.Popen(
        [sys.executable, "-m", "mgpu", "serve", *common, *nodes, "--node-rank", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        server = ServerProcess([*common, *nodes, "--node-rank", "0"])
    except BaseException:
        second.kill()
        raise
    try:
        hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(tiny_llama)
        ids = hf_tok("The quick brown").input_ids
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        expected = hf_tok.decode(ids[len(hf_tok("The quick brown").input_ids) :])
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        out = client.completions.create(
            model=str(tiny_llama), prompt="The quick brown", max_tokens=8, temperature=0
        )
        if out.choices[0].finish_reason == "length":
            assert out.choices[0].text == expected
        else:  # EOS came first: the text is a prefix of transformers' argmax continuation
            assert expected.startswith(out.choices[0].text)
        rows = httpx.get(f"{server.url}/v1/layout").json()["data"]
        assert [r["node"] for r in rows] == [0, 1]
        second.kill()
        second.wait(timeout=10)
        deadline = time.monotonic() + 30  # the 5 s heartbeat timeout, with margin
        while time.monotonic() < deadline and httpx.get(f"{server.url}/health").status_code == 200:
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health").status_code == 503
        with pytest.raises(Exception):  # noqa: B017 (any API error: the engine is down)
            client.completions.create(model=str(tiny_llama), prompt="x", max_tokens=4)
    finally:
        second.kill()
        server.stop()
