"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
plus ``/health``, ``/version`` and ``/metrics``.

Requests are checked here (model name, sampling fields, prompt length against the context) and
then handed to the :class:`~mgpu.server.async_engine.AsyncEngine`; every failure is answered with
an OpenAI-shaped error (see :mod:`mgpu.server.errors`). Streaming uses server-sent events; a
client that goes away, streaming or not, has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mgpu import __version__
from mgpu.engine.llm_engine import CompletionOutput, PromptError, RequestOutput, render_chat
from mgpu.monitor.watch import MonitorConfig
from mgpu.sampling import SampleResult, SamplingParams, SamplingParamsError
from mgpu.server import engine_routes
from mgpu.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestFailedError,
    ServerShutdownError,
)
from mgpu.server.errors import APIError, install_error_handlers, logger
from mgpu.server.metrics import Metrics
from mgpu.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
    unencodable_field,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP layer behaves (the engine has its own configs).

    Attributes:
        served_model_name: the name clients put in ``model`` and see in ``/v1/models``.
        model_aliases: other names accepted in ``model`` (e.g. the ``--model`` path).
        api_key: when set, ``/v1/*`` and the API docs (``/docs``, ``/redoc``,
            ``/openapi.json``) require ``Authorization: Bearer <api_key>``; ``/health``,
            ``/version`` and ``/metrics`` stay open.
        max_request_bytes: largest request body accepted (413 above it).
        max_n: most completions one request may ask for (``n`` and ``best_of``; 400 above it).
        monitor: device sampling and imbalance warning settings of ``/metrics``.
    """

    served_model_name: str
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    max_n: int = 16
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no authentication)")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


class _Timer:
    """Feeds one HTTP request's time to first token and latency into the metrics."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.has_first_token = False
        self.finish_reason = "abort"
        self.num_tokens = 0
        self.last_token = self.arrival

    def saw(self, out: RequestOutput) -> None:
        """Note an output: the first one carrying a token sets the time to first token, later
        ones the inter-token latency."""
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens > self.num_tokens:
            now = time.monotonic()
            if not self.has_first_token:
                self.has_first_token = True
                self.metrics.record_first_token(now - self.arrival)
            else:
                self.metrics.record_inter_token(now - self.last_token, num_tokens - self.num_tokens)
            self.num_tokens, self.last_token = num_tokens, now
        if out.finished:
            self.finish_reason = out.outputs[-1].finish_reason or "stop"

    def failed(self, exc: BaseException) -> None:
        """The request ended with an error (a client that left counts as an abort)."""
        if not (isinstance(exc, APIError) and exc.status == 499):
            self.finish_reason = "error"

    def done(self) -> None:
        """The request has ended (``finish_reason`` is ``abort`` unless an output said why)."""
        self.metrics.record_finished(time.monotonic() - self.arrival, self.finish_reason)


class _Sent:
    """How much of each choice a stream has sent, so every chunk carries only what is new.

    Args:
        num_choices: choices in the response (prompts x n).
    """

    def __init__(self, num_choices: int):
        self.chars = [0] * num_choices
        self.tokens = [0] * num_choices
        self.finished: set[int] = set()

    def take(
        self, index: int, output: CompletionOutput
    ) -> tuple[str, list[SampleResult] | None] | None:
        """The unsent text and logprobs of choice ``index``; None when there is nothing to send.

        The engine's text is cumulative and never takes back what it showed (it withholds a
        possible stop string until it is sure), so the new text is what follows the sent part.
        """
        if index in self.finished:
            return None
        text = output.text[self.chars[index] :]
        count = len(output.token_ids)
        results = None
        if output.logprobs is not None and count > self.tokens[index]:
            results = output.logprobs[self.tokens[index] : count]
        if not text and results is None and not output.finished:
            return None
        self.chars[index] += len(text)
        self.tokens[index] = count
        if output.finished:
            self.finished.add(index)
        return text, results


class OpenAIServing:
    """The request handlers, bound to one engine.

    Args:
        engine: the running engine.
        config: HTTP-layer settings.
    """

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        # One owner per tokenizer object (a `tokenizers` object used by two threads at once
        # fails with "Already borrowed"): the engine thread keeps the engine's own, the one
        # tokenize thread owns `_encoder` (prompts, chat templates), and the event loop owns
        # `tokenizer` (decoding single tokens for logprobs, prompts for echo).
        self.tokenizer = copy.deepcopy(engine.engine.tokenizer)
        self._encoder = copy.deepcopy(engine.engine.tokenizer)
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="mgpu-tokenize")
        self.max_model_len = engine.engine.scheduler_config.max_model_len
        self.metrics = Metrics(engine.engine, config.served_model_name, config.monitor)
        self._token_text: dict[int, str] = {}
        #: Set when the server starts shutting down: new requests get 503 from then on.
        self.draining = False

    def close(self) -> None:
        """Stop the tokenizer and monitor threads."""
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()

    # ---- shared checks ------------------------------------------------------------------------

    def check_model(self, model: str | None) -> str | None:
        """404 unless ``model`` names the served model or one of its LoRA adapters.

        Returns:
            The adapter's name, or None for the base model (also when ``model`` is None).
        """
        names = (self.config.served_model_name, *self.config.model_aliases)
        if model is None or model in names:
            return None
        if model in self.engine.engine.lora_names:
            return model
        served = ", ".join(f"'{n}'" for n in (names[0], *self.engine.engine.lora_names))
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves {served}",
            param="model",
            code="model_not_found",
        )

    def response_model(self, model: str | None) -> str:
        """The ``model`` of a response: the adapter's name, or the served model's."""
        return self.check_model(model) or self.config.served_model_name

    def check_healthy(self) -> None:
        """503 once the engine has stopped or the server is shutting down."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if not self.engine.is_healthy:
            raise APIError(
                503,
                f"the engine is not running: {self.engine.error or 'a worker process died'}",
                code="engine_unavailable",
            )

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str) -> None:
        """400 for a prompt the engine cannot run, or one that leaves no room for max_tokens."""
        limit, n, wanted = self.max_model_len, len(ids), params.max_tokens
        if wanted is not None and n + wanted > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but {n + wanted} were "
                f"requested: {n} in the {param} and {wanted} for the completion (max_tokens). "
                "Shorten the prompt or lower max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        try:
            self.engine.engine.check_prompt(ids, wanted)
        except PromptError as exc:
            code = "context_length_exceeded" if n >= limit else None
            raise APIError(400, str(exc), param=param, code=code) from None

    def sampling_params(self, request: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        """The request's sampling parameters; 400 naming the field when one is out of range.

        Text fields are checked first: a lone surrogate cannot reach the tokenizer.
        """
        bad = unencodable_field(request)
        if bad is not None:
            raise APIError(400, f"'{bad}' is not valid Unicode text (a lone surrogate?)", param=bad)
        try:
            params = request.sampling_params()
        except SamplingParamsError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        limit = self.config.max_n
        best_of = getattr(request, "best_of", None)
        for name, value in (("n", params.n), ("best_of", best_of)):
            if value is not None and value > limit:
                raise APIError(
                    400, f"{name} must be at most {limit} (the server's --max-n)", param=name
                )
        if best_of is not None and best_of != params.n:
            raise APIError(
                400, "best_of other than n is not supported (leave it unset)", param="best_of"
            )
        return params

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def _tokenize(self, text: str) -> list[int]:
        try:
            return list(self._encoder(text).input_ids)
        except Exception as exc:  # the tokenizer failed on this text: this request's problem
            logger.error("tokenizing a prompt failed", exc_info=exc)
            message = f"tokenizing the prompt failed: {type(exc).__name__}: {exc}"
            raise APIError(500, message, param="prompt", code="request_failed") from None

    def _apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return render_chat(self._encoder, messages)
        except PromptError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def token_text(self, token_id: int) -> str:
        """The text of one token, as logprobs report it."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    # ---- generation ---------------------------------------------------------------------------

    def _streams(
        self,
        base_id: str,
        prompts: list[_Prompt],
        params: SamplingParams,
        timer: _Timer,
        lora: str | None,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Outputs of every prompt of a request, tagged with the prompt's position."""
        gens = [
            self.engine.generate(f"{base_id}-{i}", p.ids, params, lora)
            for i, p in enumerate(prompts)
        ]
        return _merge(gens, timer)

    async def _final(
        self,
        request: Request,
        base_id: str,
        prompts: list[_Prompt],
        params: SamplingParams,
        timer: _Timer,
        lora: str | None,
    ) -> list[RequestOutput]:
        """The finished output of each prompt; aborts when the client disconnects first."""

        async def collect() -> list[RequestOutput]:
            last: dict[int, RequestOutput] = {}
            streams = self._streams(base_id, prompts, params, timer, lora)
            async with contextlib.aclosing(streams) as outs:
                async for i, out in outs:
                    last[i] = out
            return [last[i] for i in range(len(prompts))]

        try:
            return await _unless_disconnected(request, collect())
        except Exception as exc:
            error = _api_error(exc)
            timer.failed(error)
            raise error from None
        finally:
            timer.done()

    # ---- /v1/completions ----------------------------------------------------------------------

    async def completions(
        self, body: CompletionRequest, request: Request
    ) -> CompletionResponse | StreamingResponse:
        """``POST /v1/completions``."""
        timer = _Timer(self.metrics)
        lora = self.check_model(body.model)
        self.check_healthy()
        params = self.sampling_params(body)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", param="echo")
        prompts = await self._completion_prompts(body.prompt)
        for p in prompts:
            self.check_prompt(p.ids, params, "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            events = self._stream_completion(request_id, body, prompts, params, timer)
            return _SSEResponse(events)
        outputs = await self._final(request, request_id, prompts, params, timer, lora)
        choices = []
        for i, out in enumerate(outputs):
            prefix = self._prompt_text(prompts[i]) if body.echo else ""
            for c in out.outputs:
                logprobs = None
                if c.logprobs is not None:
                    logprobs, _ = self._completion_logprobs(c.logprobs, 0)
                choices.append(
                    CompletionChoice(
                        index=i * params.n + c.index,
                        text=prefix + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                    )
                )
        return CompletionResponse(
            id=request_id,
            model=self.response_model(body.model),
            choices=choices,
            usage=_usage(outputs),
        )

    async def _completion_prompts(
        self, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> list[_Prompt]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            items: list[Any] = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "'prompt' is empty", param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(_Prompt(item, await self._in_thread(self._tokenize, item)))
            else:
                prompts.append(_Prompt(None, list(item)))
        return prompts

    def _prompt_text(self, prompt: _Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.ids)

    def _completion_logprobs(
        self, results: list[SampleResult], offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """Legacy logprobs of ``results``; ``offset`` is where their text starts in the output."""
        lp = CompletionLogprobs()
        for r in results:
            text = self.token_text(r.token_id)
            lp.tokens.append(text)
            lp.token_logprobs.append(r.logprob)
            top = {self.token_text(t): v for t, v in r.top_logprobs} if r.top_logprobs else None
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(text)
        return lp, offset

    async def _stream_completion(
        self,
        request_id: str,
        body: CompletionRequest,
        prompts: list[_Prompt],
        params: SamplingParams,
        timer: _Timer,
    ) -> AsyncGenerator[str, None]:
        model, n, created = self.response_model(body.model), params.n, int(time.time())
        sent = _Sent(len(prompts) * n)
        offsets = [0] * (len(prompts) * n)
        last: dict[int, RequestOutput] = {}

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return _sse(
                CompletionResponse(
                    id=request_id, created=created, model=model, choices=choices, usage=usage
                )
            )

        try:
            if body.echo:
                echoes = [
                    CompletionChoice(index=i * n + j, text=self._prompt_text(p))
                    for i, p in enumerate(prompts)
                    for j in range(n)
                ]
                yield chunk(echoes)
            async with contextlib.aclosing(
                self._streams(request_id, prompts, params, timer, self.check_model(body.model))
            ) as outs:
                async for i, out in outs:
                    last[i] = out
                    choices = []
                    for c in out.outputs:
                        index = i * n + c.index
                        new = sent.take(index, c)
                        if new is None:
                            continue
                        text, results = new
                        logprobs = None
                        if results is not None:
                            logprobs, offsets[index] = self._completion_logprobs(
                                results, offsets[index]
                            )
                        choices.append(
                            CompletionChoice(
                                index=index,
                                text=text,
                                logprobs=logprobs,
                                finish_reason=c.finish_reason,
                            )
                        )
                    if choices:
                        yield chunk(choices)
            if body.include_usage:
                yield chunk([], _usage([last[i] for i in sorted(last)]))
            yield "data: [DONE]\n\n"
        except Exception as exc:
            error = _api_error(exc)
            timer.failed(error)
            yield _sse_error(error)
        finally:
            timer.done()

    # ---- /v1/chat/completions -----------------------------------------------------------------

    async def chat_completions(
        self, body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | StreamingResponse:
        """``POST /v1/chat/completions``."""
        timer = _Timer(self.metrics)
        lora = self.check_model(body.model)
        self.check_healthy()
        params = self.sampling_params(body)
        ids = await self._in_thread(self._apply_chat_template, body.chat_messages())
        prompt = _Prompt(None, ids)
        self.check_prompt(ids, params, "messages")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _SSEResponse(self._stream_chat(request_id, body, prompt, params, timer))
        (out,) = await self._final(request, request_id, [prompt], params, timer, lora)
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for c in out.outputs
        ]
        return ChatCompletionResponse(
            id=request_id,
            model=self.response_model(body.model),
            choices=choices,
            usage=_usage([out]),
        )

    def _chat_logprobs(self, results: list[SampleResult]) -> ChatLogprobs:
        content = []
        for r in results:
            text = self.token_text(r.token_id)
            top = [self._top_logprob(i, v) for i, v in r.top_logprobs or []]
            content.append(
                ChatTokenLogprob(
                    token=text,
                    logprob=r.logprob if r.logprob is not None else 0.0,
                    bytes=list(text.encode()),
                    top_logprobs=top,
                )
            )
        return ChatLogprobs(content=content)

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    async def _stream_chat(
        self,
        request_id: str,
        body: ChatCompletionRequest,
        prompt: _Prompt,
        params: SamplingParams,
        timer: _Timer,
    ) -> AsyncGenerator[str, None]:
        model, n, created = self.response_model(body.model), params.n, int(time.time())
        sent = _Sent(n)
        last: RequestOutput | None = None

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
            return _sse(
                ChatCompletionChunk(
                    id=request_id, created=created, model=model, choices=choices, usage=usage
                )
            )

        try:
            roles = [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(n)
            ]
            yield chunk(roles)
            async with contextlib.aclosing(
                self._streams(request_id, [prompt], params, timer, self.check_model(body.model))
            ) as outs:
                async for _, out in outs:
                    last = out
                    choices = []
                    for c in out.outputs:
                        new = sent.take(c.index, c)
                        if new is None:
                            continue
                        text, results = new
                        choices.append(
                            ChatChunkChoice(
                                index=c.index,
                                delta=DeltaMessage(content=text) if text else DeltaMessage(),
                                logprobs=self._chat_logprobs(results) if results else None,
                                finish_reason=c.finish_reason,
                            )
                        )
                    if choices:
                        yield chunk(choices)
            if body.include_usage and last is not None:
                yield chunk([], _usage([last]))
            yield "data: [DONE]\n\n"
        except Exception as exc:
            error = _api_error(exc)
            timer.failed(error)
            yield _sse_error(error)
        finally:
            timer.done()

    # ---- the rest -----------------------------------------------------------------------------

    def models(self) -> ModelList:
        """``GET /v1/models``."""
        engine, base = self.engine.engine, self.config.served_model_name
        cards = [ModelCard(id=base, root=str(engine.model_path), max_model_len=self.max_model_len)]
        # LoRA adapters beside the base model, as vLLM lists them: parent = the base model.
        cards += [
            ModelCard(
                id=name, root=engine.lora_path(name), parent=base, max_model_len=self.max_model_len
            )
            for name in engine.lora_names
        ]
        return ModelList(data=cards)

    def health(self) -> JSONResponse:
        """``GET /health``: 200 while every worker is alive and the server is not shutting down,
        503 otherwise; ``error`` then says why (a dead worker's message names its rank)."""
        executor = self.engine.engine.executor
        body: dict[str, Any] = {
            "status": "ok" if self.engine.is_healthy else "unhealthy",
            "model": self.config.served_model_name,
            "worker_pids": [p.pid for p in executor.procs],
            "requests_in_flight": self.engine.num_in_flight,
        }
        if not self.engine.is_healthy:
            body["error"] = self.engine.error or "a worker process died"
            return JSONResponse(body, status_code=503)
        if self.draining:
            body["status"] = "draining"
            body["error"] = "the server is shutting down"
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``engine``.

    Args:
        engine: the running engine; the app shuts it down (and its workers) when it stops.
        config: HTTP-layer settings.
    """
    serving = OpenAIServing(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        serving.close()
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="mgpu", version=__version__, lifespan=lifespan)
    app.state.serving = serving
    install_error_handlers(app)
    app.add_middleware(_GuardMiddleware, config=config)
    app.include_router(engine_routes.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        return serving.health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            serving.metrics.render(engine.is_healthy),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @app.get("/v1/models")
    async def models() -> ModelList:
        return serving.models()

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> CompletionResponse | StreamingResponse:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | StreamingResponse:
        return await serving.chat_completions(body, request)

    return app


# ---- helpers ------------------------------------------------------------------------------------


#: Paths besides ``/v1/*`` that ``--api-key`` guards: the API's own description.
GUARDED_DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _bearer_matches(header: bytes, key: bytes) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <key>``; the scheme is case-insensitive
    (RFC 9110), the key is compared in constant time."""
    scheme, _, token = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class _GuardMiddleware:
    """Checks the API key on ``/v1/*`` and the docs, and caps the body size, before any parsing.

    The body is read here, whole, so a client cannot make the server buffer more than
    ``max_request_bytes``; the application then receives it as usual.
    """

    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app = app
        self.limit = config.max_request_bytes
        self.expected = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        guarded = path.startswith("/v1") or path in GUARDED_DOCS
        if (
            self.expected is not None
            and guarded
            and not _bearer_matches(headers.get(b"authorization", b""), self.expected)
        ):
            error = APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
            await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        too_large = APIError(
            413,
            f"the request body is larger than the server's limit of {self.limit} bytes",
            code="request_too_large",
        )
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await too_large.response({"Connection": "close"})(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            if len(body) > self.limit:
                await too_large.response({"Connection": "close"})(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed, so an abort is never left pending."""

    def __init__(self, events: AsyncGenerator[str, None]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


async def _merge(
    gens: list[AsyncGenerator[RequestOutput, None]], timer: _Timer
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Interleave the outputs of several requests as they come; closing it aborts them all."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as gen:
            async for out in gen:
                timer.saw(out)
                yield 0, out
        return
    merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for out in gen:
                    merged.put_nowait((i, out))
        except Exception as exc:
            merged.put_nowait((i, exc))
        else:
            merged.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                timer.saw(item)
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (499)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "the client closed the connection")
    return task.result()


def _api_error(exc: Exception) -> APIError:
    """The OpenAI-shaped error for an exception raised while generating."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ServerShutdownError):
        return APIError(503, str(exc), code="server_shutting_down")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine stopped: {exc}", code="engine_unavailable")
    if isinstance(exc, RequestFailedError):
        logger.error("request failed in the engine: %s", exc)
        return APIError(500, f"the request failed: {exc}", code="request_failed")
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, PromptError):
        return APIError(400, str(exc), param="prompt")
    logger.error("request failed", exc_info=exc)
    return APIError(500, "internal server error; the server log has the details")


def _sse(payload: CompletionResponse | ChatCompletionChunk) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


def _sse_error(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


def _usage(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
