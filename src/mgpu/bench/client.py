"""One streamed request against an OpenAI-compatible endpoint, timed chunk by chunk.

A request is an error when the server answers a non-2xx status, sends an ``error`` object in the
stream, closes the connection before ``data: [DONE]``, or times out; the run goes on either way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from mgpu.bench.workload import BenchRequest


@dataclass
class RequestResult:
    """What one request did.

    Attributes:
        ok: it finished with ``[DONE]`` and no error.
        error: a short reason when not ok (``HTTP 500``, ``RemoteProtocolError``, ...).
        start: when it was sent (``time.perf_counter``).
        ttft: seconds from sending to the first chunk with text.
        latency: seconds from sending to the end of the stream.
        chunk_times: arrival time of every chunk with text, seconds after ``start``.
        output_tokens: completion tokens: the server's usage count, else chunks with text.
        prompt_tokens: the server's usage count (0 when it sends none).
        usage_reported: the server sent a usage chunk.
    """

    ok: bool = False
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    latency: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage_reported: bool = False

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive chunks with text (vLLM's benchmark measures the same)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def time_per_output_token(self) -> float | None:
        """Seconds per token after the first: (latency - ttft) / (output tokens - 1)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def request_body(req: BenchRequest, model: str, endpoint: str, extra: dict | None = None) -> dict:
    """The JSON body of a streamed completions or chat request, ``extra`` fields merged in."""
    body: dict = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body | (extra or {})


def _text_of(chunk: dict, endpoint: str) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def send(
    client: httpx.AsyncClient,
    url: str,
    req: BenchRequest,
    model: str,
    endpoint: str = "completions",
    headers: dict[str, str] | None = None,
    extra_body: dict | None = None,
) -> RequestResult:
    """Send one streamed request and time it; never raises for a server's failure.

    Args:
        client: the shared async client (its timeout applies).
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        req: prompt and max_tokens.
        model: the ``model`` field.
        endpoint: ``completions`` (``/v1/completions``) or ``chat`` (``/v1/chat/completions``).
        headers: extra headers (an ``Authorization`` bearer key).
        extra_body: fields added to the request body (``logit_bias`` for a server that ignores
            ``ignore_eos``).
    """
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    result = RequestResult(start=time.perf_counter())
    chunks_with_text = 0
    done = False
    try:
        async with client.stream(
            "POST",
            url.rstrip("/") + path,
            json=request_body(req, model, endpoint, extra_body),
            headers=headers,
        ) as response:
            if response.status_code >= 300:
                await response.aread()
                result.error = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    message = chunk["error"]
                    result.error = "stream error: " + str(
                        message.get("message") if isinstance(message, dict) else message
                    )
                    return result
                now = time.perf_counter() - result.start
                if _text_of(chunk, endpoint):
                    chunks_with_text += 1
                    result.chunk_times.append(now)
                    if result.ttft is None:
                        result.ttft = now
                usage = chunk.get("usage")
                if usage:
                    result.usage_reported = True
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = type(exc).__name__
        return result
    finally:
        result.latency = time.perf_counter() - result.start
    if not done:
        result.error = "stream ended without [DONE]"
        return result
    if not result.usage_reported:
        result.output_tokens = chunks_with_text
    result.ok = True
    return result
