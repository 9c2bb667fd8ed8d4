"""``mgpu serve --enable-lora --lora-modules ...`` through the official openai client."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from mgpu.models.loader import demo_model_path
from mgpu.serve import main as serve_main
from tests.lora.conftest import MAX_TOKENS, PROMPTS
from tests.server.conftest import ServerProcess, stop_and_check


@pytest.fixture(scope="module")
def server(adapters: dict[str, Path]) -> Iterator[ServerProcess]:
    """A TP=2 server of the demo model with both test adapters (one of them in vLLM's JSON form)."""
    proc = ServerProcess(
        [
            *("--device", "cpu", "--dtype", "float32", "--tensor-parallel-size", "2"),
            *("--max-model-len", "64", "--served-model-name", "demo"),
            *("--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules"),
            f"all={adapters['all']}",
            f'{{"name": "qv", "path": "{adapters["qv"]}"}}',
        ]
    )
    yield proc
    stop_and_check(proc)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_models_lists_adapters_beside_the_base(
    client: openai.OpenAI, server: ServerProcess, adapters: dict[str, Path]
) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"demo", "all", "qv"}
    raw = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert raw["demo"]["parent"] is None
    assert raw["all"]["parent"] == raw["qv"]["parent"] == "demo"
    assert raw["qv"]["root"] == str(adapters["qv"])
    assert f"LoRA adapter qv ({adapters['qv']}): request it as model 'qv'" in server.log


def test_concurrent_requests_for_adapters_and_base_get_their_own_text(
    client: openai.OpenAI, references: dict[str | None, list[list[int]]]
) -> None:
    """Requests for both adapters and the base model at once: they share the engine's batches."""
    tok = AutoTokenizer.from_pretrained(demo_model_path())
    jobs = [(model, i) for i in range(len(PROMPTS)) for model in ("all", "qv", "demo")]

    def run(job: tuple[str, int]) -> tuple[str, str]:
        model, i = job
        out = client.completions.create(
            model=model,
            prompt=PROMPTS[i],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return out.model, out.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (model, i), (answered_by, text) in zip(jobs, results, strict=True):
        assert answered_by == model
        ref = references[None if model == "demo" else model][i]
        assert text == tok.decode(ref, skip_special_tokens=True), (model, i)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    body = info.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "'all'" in body["message"] and "'qv'" in body["message"]


def _serve_stderr(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``python -m mgpu.serve ARGV`` in this process (its own ``main``), which must refuse to
    start: exit status 2, one line on stderr and no traceback. Returns stderr."""
    status = serve_main(["--device", "cpu", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    return err


def test_adapter_above_max_lora_rank_stops_the_start(
    adapters: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """Refused before any worker starts, with the flag to change."""
    argv = ["--enable-lora", "--max-lora-rank", "4", "--lora-modules", f"all={adapters['all']}"]
    err = _serve_stderr(argv, capsys)
    assert "LoRA adapter 'all'" in err
    assert "has rank 8, above --max-lora-rank 4" in err


def test_adapter_named_like_the_served_model_stops_the_start(
    adapters: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """An adapter called like the base model would be shadowed by it: refused, naming both ways
    out."""
    argv = [
        *("--served-model-name", "base", "--enable-lora", "--max-lora-rank", "8"),
        *("--lora-modules", f"base={adapters['all']}"),
    ]
    err = _serve_stderr(argv, capsys)
    assert "LoRA adapter name 'base' is also the served model's name" in err


def test_streamed_chat_on_an_adapter(client: openai.OpenAI) -> None:
    """The streaming path carries the adapter too: its text equals the non-streamed answer."""
    messages = [{"role": "user", "content": "Hello"}]
    kwargs = {"model": "qv", "messages": messages, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    base = client.chat.completions.create(**{**kwargs, "model": "demo"}).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert {c.model for c in chunks} == {"qv"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert whole != base
