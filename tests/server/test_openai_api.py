"""``mgpu serve`` through the official ``openai`` client, at TP=1 and TP=2, against the offline
engine: greedy text must be identical, streamed or not, alone or among 32 concurrent clients, with
or without pre-emption. Bad requests get OpenAI-shaped errors and the server keeps serving.

Two servers (session fixtures, see conftest.py) serve the whole module: TP=1 with a deliberately
small KV cache (24 blocks of 16 tokens, so 32 clients force pre-emption), and TP=2 behind an API key
with a long context.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import (
    API_KEY,
    LONG_MODEL_LEN,
    MAX_MODEL_LEN,
    Reference,
    ServerProcess,
)

PROMPTS = [
    "The quick brown fox",
    "Tensor parallelism splits",
    "naïve café — 你好",
    "pipeline parallelism gives each device",
    "numbers 0123456789 and",
]


@pytest.fixture(params=["tp1", "tp2"])
def api(request: pytest.FixtureRequest) -> tuple[ServerProcess, openai.OpenAI]:
    """Each server with an ``openai`` client pointed at it."""
    server: ServerProcess = request.getfixturevalue(f"server_{request.param}")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    return server, client


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


# ---- the happy paths ----------------------------------------------------------------------------


def test_completions_match_offline(
    api: tuple[ServerProcess, openai.OpenAI], reference: Reference
) -> None:
    _, client = api
    for prompt in PROMPTS[:3]:
        expected = reference.complete(prompt, 16)
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert out.choices[0].text == expected.outputs[0].text
        assert out.choices[0].finish_reason == expected.outputs[0].finish_reason
        assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)
        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == expected.outputs[0].text
        assert chunks[-1].choices[0].finish_reason == expected.outputs[0].finish_reason


def test_chat_matches_offline(
    api: tuple[ServerProcess, openai.OpenAI], reference: Reference
) -> None:
    _, client = api
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "The quick brown fox"},
    ]
    expected = reference.chat(messages, 12)
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == len(reference.chat_ids(messages))
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_prompt_as_token_ids_and_batch(server_tp1: ServerProcess, reference: Reference) -> None:
    client = _client(server_tp1)
    ids = [reference.tokenizer(p).input_ids for p in PROMPTS[:2]]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, n=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    for choice in out.choices:
        prompt = PROMPTS[choice.index // 2]
        assert choice.text == reference.complete(prompt, 8).outputs[0].text
    texts = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [c.text for c in sorted(texts.choices, key=lambda c: c.index)] == [
        reference.complete(p, 8).outputs[0].text for p in PROMPTS[:2]
    ]


def test_max_tokens_defaults_to_the_rest_of_the_context(
    server_tp1: ServerProcess, reference: Reference
) -> None:
    client = _client(server_tp1)
    out = client.completions.create(
        model="tiny", prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True}
    )
    prompt_len = len(reference.tokenizer(PROMPTS[0]).input_ids)
    assert out.usage.completion_tokens == MAX_MODEL_LEN - prompt_len
    assert out.choices[0].finish_reason == "length"


def test_n_and_logprobs(server_tp1: ServerProcess, reference: Reference) -> None:
    client = _client(server_tp1)
    out = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=6, n=3, temperature=0.9, seed=7, logprobs=2
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    expected = reference.complete(PROMPTS[1], 6, n=3, temperature=0.9, seed=7, logprobs=2)
    for choice in out.choices:
        offline = expected.outputs[choice.index]
        assert choice.text == offline.text
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert lp.token_logprobs == pytest.approx([r.logprob for r in offline.logprobs], abs=1e-4)
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    entries = [
        e
        for c in chat
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == 4
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def test_models_health_version(server_tp1: ServerProcess) -> None:
    models = _client(server_tp1).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(f"{server_tp1.url}/health").json()
    assert health["status"] == "ok" and len(health["worker_pids"]) == 1
    assert "version" in httpx.get(f"{server_tp1.url}/version").json()


# ---- load: concurrency, pre-emption, disconnects -------------------------------------------------


def _concurrent_prompts(count: int) -> list[str]:
    words = ["fox", "dog", "tensor", "pipeline", "café", "numbers", "quick", "lazy", "device"]
    return [f"{words[i % len(words)]} {words[(i * 5 + 3) % len(words)]} {i}" for i in range(count)]


def test_32_concurrent_streams_with_preemption(
    server_tp1: ServerProcess, reference: Reference
) -> None:
    prompts = _concurrent_prompts(32)
    expected = [reference.complete(p, 20, ignore_eos=True).outputs[0].text for p in prompts]
    before = server_tp1.wait_idle()
    texts = asyncio.run(_stream_all(server_tp1, prompts, 20))
    assert texts == expected
    after = server_tp1.wait_idle()
    # 32 sequences of ~27 tokens need 64 blocks; the cache has 24, so some were pre-empted.
    assert after["mgpu_num_preemptions_total"] > before["mgpu_num_preemptions_total"]
    assert after["mgpu_kv_cache_free_blocks"] == after["mgpu_kv_cache_blocks"] == 24
    assert after["mgpu_generation_tokens_total"] >= before["mgpu_generation_tokens_total"] + 640


async def _stream_all(server: ServerProcess, prompts: list[str], max_tokens: int) -> list[str]:
    """Stream every prompt at once (greedy, EOS ignored); returns the texts in prompt order."""
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    )

    async def one(prompt: str) -> str:
        stream = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].text async for c in stream])

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def test_disconnect_mid_stream_frees_blocks(server_tp2: ServerProcess) -> None:
    start = server_tp2.wait_idle()
    body = {
        "model": "tiny",
        "prompt": PROMPTS[0],
        "max_tokens": LONG_MODEL_LEN - 64,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server_tp2.url}/v1/completions"
    with (
        httpx.Client(timeout=30, headers=headers) as http,
        http.stream("POST", url, json=body) as response,
    ):
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data:")
            if received == 3:
                running = server_tp2.metrics()
                break  # leaving the iterator closes the connection
        assert running["mgpu_num_requests_running"] == 1
        assert running["mgpu_kv_cache_free_blocks"] < start["mgpu_kv_cache_free_blocks"]
    # The client has gone: the request is aborted and its blocks return to the pool.
    end = server_tp2.wait_idle(timeout=15)
    assert end["mgpu_kv_cache_free_blocks"] == start["mgpu_kv_cache_free_blocks"]
    aborted = 'mgpu_request_success_total{finished_reason="abort"}'
    assert end[aborted] == start.get(aborted, 0) + 1
    generated = end["mgpu_generation_tokens_total"] - start["mgpu_generation_tokens_total"]
    assert 3 <= generated < LONG_MODEL_LEN - 64


def test_disconnect_while_waiting_for_a_full_response(server_tp2: ServerProcess) -> None:
    start = server_tp2.wait_idle()
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": LONG_MODEL_LEN - 64}
    body["ignore_eos"] = True
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server_tp2.url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(5, read=0.5),
        )
    end = server_tp2.wait_idle(timeout=15)
    assert end["mgpu_kv_cache_free_blocks"] == start["mgpu_kv_cache_free_blocks"]
    generated = end["mgpu_generation_tokens_total"] - start["mgpu_generation_tokens_total"]
    assert generated < LONG_MODEL_LEN - 64


# ---- bad input -----------------------------------------------------------------------------------


BAD_REQUESTS = [
    # (path, body, status, param, words in the message)
    ("completions", "{not json", 400, None, ["JSON"]),
    ("completions", {"model": "tiny"}, 400, "prompt", ["prompt", "required"]),
    ("completions", {"prompt": 5}, 400, "prompt", ["prompt"]),
    ("completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens", ["max_tokens"]),
    ("completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", ["max_tokens"]),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature", ["temperature"]),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", ["top_p"]),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", ["top_p"]),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", ["n must"]),
    ("completions", {"prompt": [], "max_tokens": 3}, 400, "prompt", ["empty"]),
    ("completions", {"prompt": [99999]}, 400, "prompt", ["vocabulary"]),
    ("completions", {"prompt": "x", "max_tokens": 500}, 400, "prompt", ["128", "500"]),
    ("completions", {"prompt": "x", "model": "gpt-9"}, 404, "model", ["gpt-9"]),
    ("chat/completions", {"messages": []}, 400, "messages", ["messages"]),
    ("chat/completions", {"messages": "hi"}, 400, "messages", ["messages"]),
    (
        "chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
        ["role"],
    ),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role", ["required"]),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400},
        400,
        "messages",
        ["128", "400"],
    ),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "model": "nope"},
        404,
        "model",
        ["nope"],
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), BAD_REQUESTS)
def test_bad_request(
    server_tp1: ServerProcess,
    path: str,
    body: Any,
    status: int,
    param: str | None,
    words: list[str],
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        f"{server_tp1.url}/v1/{path}",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error
    assert "Traceback" not in response.text


def test_limits_and_unknown_fields(server_tp1: ServerProcess, reference: Reference) -> None:
    url = f"{server_tp1.url}/v1/completions"
    big = httpx.post(url, json={"prompt": "x" * 70000}, timeout=30)
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(f"{server_tp1.url}/v1/nothing-here", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    ok = httpx.post(
        url,
        json={"prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "frobnicate": True},
        timeout=30,
    )
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["text"] == reference.complete(PROMPTS[2], 5).outputs[0].text


def test_api_key(server_tp2: ServerProcess) -> None:
    url = server_tp2.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    for scheme in ("Bearer", "bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} {API_KEY}"}
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=30).status_code == 200
    # The API's description is guarded too; health and metrics stay open for probes.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 401
        headers = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.get(f"{url}{path}", headers=headers, timeout=30).status_code == 200
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200


# ---- metrics -------------------------------------------------------------------------------------


def test_metrics_exposition(server_tp1: ServerProcess) -> None:
    _client(server_tp1).completions.create(model="tiny", prompt="x", max_tokens=2)
    text = httpx.get(f"{server_tp1.url}/metrics", timeout=30).text
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    assert types["mgpu_num_preemptions_total"] == "counter"
    assert types["mgpu_kv_cache_usage_perc"] == "gauge"
    assert types["mgpu_time_to_first_token_seconds"] == "histogram"
    assert types["mgpu_e2e_request_latency_seconds"] == "histogram"
    for name, kind in types.items():
        assert name.startswith("mgpu_")
        assert name.endswith("_total") == (kind == "counter")
    m = server_tp1.metrics()
    buckets = [v for k, v in m.items() if k.startswith("mgpu_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == m["mgpu_time_to_first_token_seconds_count"]
    assert m['mgpu_e2e_request_latency_seconds_bucket{le="+Inf"}'] >= 1
    assert 0 <= m["mgpu_kv_cache_usage_perc"] <= 1


def test_server_keeps_serving(server_tp1: ServerProcess) -> None:
    start = time.monotonic()
    out = _client(server_tp1).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "still there?"}], max_tokens=3
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - start < 30
    assert httpx.get(f"{server_tp1.url}/health", timeout=30).status_code == 200
