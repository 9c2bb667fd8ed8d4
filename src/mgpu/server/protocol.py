"""OpenAI-compatible request and response bodies (the subset mgpu serves), as pydantic models.

Requests ignore fields they do not know, as OpenAI's own server does for forward compatibility.
Range checks on sampling fields are left to :class:`~mgpu.sampling.SamplingParams`, so the server
and the offline API accept exactly the same values; this module checks types and shapes, the
fields only the protocol has (``top_logprobs``), and that text can be encoded
(:func:`unencodable_field`). The server adds its own limits (``--max-n``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from mgpu.sampling import MAX_LOGPROBS, SamplingParams, SamplingParamsError, is_encodable


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, accepted under the same names.
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    skip_special_tokens: bool = True

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, token ids, or a list of either."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters for this request (raises SamplingParamsError)."""
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Request):
    """One text part of a message whose ``content`` is a list of parts."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters for this request (raises SamplingParamsError)."""
        top = None
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise SamplingParamsError("top_logprobs", "top_logprobs needs logprobs: true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise SamplingParamsError(
                    "top_logprobs",
                    f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                )
        if self.logprobs:
            top = self.top_logprobs or 0
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        return self._sampling_params(max_tokens, top)

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation as plain dicts for ``apply_chat_template``."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def unencodable_field(request: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The first text field of ``request`` that UTF-8 cannot encode (a lone surrogate, which JSON
    allows as ``"\\ud800"``), as the path a client sent it under; None when all are fine.

    Args:
        request: a parsed request.
    """
    fields: list[tuple[str, str]] = []
    if isinstance(request, CompletionRequest):
        prompt = request.prompt
        if isinstance(prompt, str):
            fields.append(("prompt", prompt))
        elif prompt and isinstance(prompt[0], str):
            fields += [(f"prompt[{i}]", p) for i, p in enumerate(prompt) if isinstance(p, str)]
    else:
        for i, m in enumerate(request.messages):
            fields.append((f"messages[{i}].content", m.text()))
            if m.name is not None:
                fields.append((f"messages[{i}].name", m.name))
    stop = request.stop
    if isinstance(stop, str):
        fields.append(("stop", stop))
    elif stop:
        fields += [(f"stop[{i}]", s) for i, s in enumerate(stop)]
    for name in ("model", "user"):
        value = getattr(request, name)
        if value is not None:
            fields.append((name, value))
    return next((name for name, text in fields if not is_encodable(text)), None)


# ---- responses -----------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A completions response, or (``object="text_completion"`` too) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    """One alternative token at a position."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    """The sampled token at a position, with the top alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat logprobs: one entry per generated token."""

    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """A chat completions response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """The new part of a streamed message; fields that did not change are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mgpu"
    root: str
    #: The base model of a LoRA adapter (None for the base model itself), vLLM's field.
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The body of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``, the shape of every error the server returns."""

    error: ErrorInfo

    @classmethod
    def of(
        cls, message: str, type_: str, param: str | None = None, code: str | None = None
    ) -> dict[str, Any]:
        """The JSON body of an error."""
        return cls(
            error=ErrorInfo(message=message, type=type_, param=param, code=code)
        ).model_dump()
