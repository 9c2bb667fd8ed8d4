"""Routes about the engine itself: ``/tokenize`` and ``/detokenize`` (vLLM's), ``/v1/layout``.

Included by :func:`mgpu.server.app.build_app`; the tokenizer is used on the app's tokenizer thread
(``OpenAIServing._in_thread``), its one owner.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from mgpu.server.errors import APIError

router = APIRouter()


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` body: a ``prompt``, or chat ``messages`` rendered by the template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    """The token ids, their count and the server's context length."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize`` body."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


class DetokenizeResponse(BaseModel):
    """The text of the tokens."""

    prompt: str


def _serving(request: Request) -> Any:
    return request.app.state.serving


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt or a conversation, as the completions endpoints would feed them."""
    serving = _serving(request)
    engine = serving.engine.engine
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
    if body.messages is not None:
        ids = await serving._in_thread(serving._apply_chat_template, body.messages)
    else:
        tokenizer = serving._encoder  # the tokenize thread's own copy (one owner per tokenizer)
        ids = await serving._in_thread(
            lambda: list(
                tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
            )
        )
    limit = engine.scheduler_config.max_model_len
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=limit)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of a list of token ids; 400 naming an id outside the vocabulary."""
    serving = _serving(request)
    engine = serving.engine.engine
    vocab = engine.model_config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(
            400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "tokens"
        )
    text = await serving._in_thread(serving._encoder.decode, body.tokens)
    return DetokenizeResponse(prompt=text)


@router.get("/v1/layout")
async def layout(request: Request) -> dict[str, Any]:
    """One row per rank: what was built beside the planner's prediction (``LLM.layout()``)."""
    return {"object": "list", "data": _serving(request).engine.engine.layout()}
