"""A request whose detokenisation raises in the engine thread fails alone: the server's engine
loop delivers :class:`RequestFailedError` to it and the correct greedy text to the others, and
stays healthy. (Sampler faults inside a worker are covered through HTTP in test_robustness.py.)
The server's tokenizers have one owning thread each."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mgpu import SamplingParams
from mgpu.engine import llm_engine
from mgpu.engine.llm_engine import LLMEngine
from mgpu.server.app import OpenAIServing, ServerConfig
from mgpu.server.async_engine import AsyncEngine, RequestFailedError
from tests.server.conftest import MAX_MODEL_LEN, Reference

PROMPTS = ["The quick brown fox", "Tensor parallelism splits", "numbers 42", "naïve café"]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine(
        LLMEngine(str(model_dir), device="cpu", max_model_len=MAX_MODEL_LEN, num_blocks=64)
    )
    yield async_engine
    async_engine.shutdown()


def test_detokenizer_failure_fails_one_request(
    engine: AsyncEngine, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = llm_engine.detokenize_incrementally

    def flaky(tokenizer: Any, seq: Any, flush: bool = False) -> str:
        if seq.request_id == "doomed" and len(seq.output_token_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(tokenizer, seq, flush)

    monkeypatch.setattr(llm_engine, "detokenize_incrementally", flaky)
    params = SamplingParams(temperature=0, max_tokens=16)
    texts: dict[str, str] = {}
    errors: dict[str, BaseException] = {}

    def run(request_id: str, prompt: str) -> None:
        ids = engine.engine.tokenize(prompt)
        try:
            for out in engine.generate_blocking(request_id, ids, params):
                texts[request_id] = out.outputs[0].text
        except RequestFailedError as exc:
            errors[request_id] = exc

    jobs = [(f"ok{i}", p) for i, p in enumerate(PROMPTS)] + [("doomed", PROMPTS[0])]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(errors) == {"doomed"}
    assert "detokenizing the output failed" in str(errors["doomed"])
    assert "injected" in str(errors["doomed"])
    for i, prompt in enumerate(PROMPTS):
        assert texts[f"ok{i}"] == reference.complete(prompt, 16).outputs[0].text
    assert engine.is_healthy
    assert engine.engine.stats.num_running == 0
    assert not engine.engine.has_unfinished_requests()


def test_each_thread_has_its_own_tokenizer(engine: AsyncEngine) -> None:
    """The event loop, the tokenize thread and the engine thread never share a Rust tokenizer."""
    serving = OpenAIServing(engine, ServerConfig("tiny"))
    try:
        owners = [serving.tokenizer, serving._encoder, engine.engine.tokenizer]
        backends = {id(t._tokenizer) for t in owners}
        assert len(backends) == 3
        text = PROMPTS[2]
        assert serving._tokenize(text) == engine.engine.tokenize(text)
    finally:
        serving.close()


def test_a_step_wakes_the_event_loop_once(engine: AsyncEngine, reference: Reference) -> None:
    """Concurrent streams on one event loop get each step's outputs through one
    ``call_soon_threadsafe``, not one per request, and every stream still reads its own text."""
    import asyncio

    params = SamplingParams(temperature=0, max_tokens=12)
    wakeups: list[int] = []

    async def main() -> dict[str, str]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any) -> Any:
            wakeups.append(len(args[0]) if args and isinstance(args[0], list) else 1)
            return real(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

        async def one(request_id: str, prompt: str) -> tuple[str, str]:
            text = ""
            async for out in engine.generate(request_id, engine.engine.tokenize(prompt), params):
                text = out.outputs[0].text
            return request_id, text

        jobs = [one(f"w{i}", p) for i, p in enumerate(PROMPTS)]
        return dict(await asyncio.gather(*jobs))

    texts = asyncio.run(main())
    for i, prompt in enumerate(PROMPTS):
        assert texts[f"w{i}"] == reference.complete(prompt, 12).outputs[0].text
    # Steps that moved all four streams woke the loop once for the four of them.
    assert max(wakeups) == len(PROMPTS)
    assert len(wakeups) < len(PROMPTS) * 12
