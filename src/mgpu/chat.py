"""``mgpu chat``: a conversation in the terminal, in the manner of ``ollama run``.

With ``--url`` it streams replies from a running ``mgpu serve`` (or any OpenAI-compatible server)
through ``/v1/chat/completions``; without, it starts an engine in this process on ``--model``.
The conversation is kept and sent whole each turn. ``/bye`` or end of input (Ctrl-D) quits,
``/clear`` forgets the conversation, Ctrl-C stops a reply that is being written.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

from mgpu.entry import API_KEY_ENV
from mgpu.errors import MgpuError

#: Control characters a model could use to drive the terminal; replies are shown without them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

PROMPT = ">>> "
HELP = "Commands: /bye quits, /clear forgets the conversation, /help shows this."


class ChatError(MgpuError):
    """A reply could not be produced (server error, prompt too long); the chat goes on."""


class ChatBackend(Protocol):
    """Where replies come from."""

    model_name: str

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """The reply to ``messages``, piece by piece."""
        ...

    def close(self) -> None:
        """Release the connection or the engine."""
        ...


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The chat's own flags (the engine flags come from :class:`mgpu.config.EngineArgs`).

    Args:
        parser: the ``chat`` subcommand's parser.
    """
    g = parser.add_argument_group("chat")
    g.add_argument(
        "--url",
        default=None,
        help="a running server, e.g. http://127.0.0.1:8000 (default: none, start an engine here)",
    )
    g.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"default: ${API_KEY_ENV}"
    )
    g.add_argument("--system", default=None, help="a system message opening the conversation")
    g.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)


def sanitize(text: str) -> str:
    """``text`` without terminal control characters (newlines and tabs are kept)."""
    return _CONTROL.sub("", text)


class RemoteChat:
    """Replies streamed from an OpenAI-compatible server.

    Args:
        url: the server's base URL (with or without ``/v1``).
        api_key: sent as a bearer token when set.
        model: the model name to ask for (default: the server's first model).
        options: sampling fields sent with every request.
    """

    def __init__(self, url: str, api_key: str | None, model: str | None, options: dict[str, Any]):
        import httpx

        base = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=base, headers=headers, timeout=httpx.Timeout(30.0, read=None)
        )
        self.options = options
        self.model_name = model or self._first_model()

    def _first_model(self) -> str:
        import httpx

        try:
            response = self.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise MgpuError(f"cannot reach {self.client.base_url}: {exc}") from None
        if response.status_code != 200:
            raise MgpuError(f"{self.client.base_url}/v1/models: {_error_message(response)}")
        return response.json()["data"][0]["id"]

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Stream the reply through server-sent events."""
        import httpx

        body = {"model": self.model_name, "messages": messages, "stream": True, **self.options}
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise ChatError(_error_message(response))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise ChatError(event["error"].get("message", "the server failed"))
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            yield piece
        except httpx.HTTPError as exc:
            raise ChatError(f"lost the server: {exc}") from None

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()


class LocalChat:
    """Replies from an engine started in this process.

    Args:
        args: the parsed ``chat`` flags (engine flags included).
        options: ``SamplingParams`` fields for every reply.
    """

    def __init__(self, args: argparse.Namespace, options: dict[str, Any]):
        from mgpu.config import EngineArgs
        from mgpu.engine.llm_engine import LLMEngine
        from mgpu.server.async_engine import AsyncEngine

        engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
        self.engine = AsyncEngine(engine)
        self.options = options
        self.model_name = engine.model_path.name
        self._ids = itertools.count()

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Generate the reply with the engine, streaming its new text."""
        from mgpu.engine.llm_engine import PromptError
        from mgpu.sampling import SamplingParams

        engine = self.engine.engine
        params = SamplingParams(**self.options)
        try:
            ids = engine.chat_prompt_ids(messages)
            engine.check_prompt(ids, params.max_tokens)
        except PromptError as exc:
            raise ChatError(f"{exc}; /clear starts a new conversation") from None
        sent = 0
        for out in self.engine.generate_blocking(f"chat-{next(self._ids)}", ids, params):
            text = out.outputs[0].text
            yield text[sent:]
            sent = len(text)

    def close(self) -> None:
        """Stop the engine."""
        self.engine.shutdown()


def converse(backend: ChatBackend, system: str | None, out: TextIO = sys.stdout) -> int:
    """The read-reply loop; returns the exit status.

    Args:
        backend: where replies come from.
        system: an optional system message kept at the head of the conversation.
        out: where replies are written.
    """
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    out.write(f"Chatting with {backend.model_name}. {HELP}\n")
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\nUse Ctrl-D or /bye to quit.\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/clear":
            history = list(opening)
            out.write("Cleared the conversation.\n")
            continue
        if text.startswith("/"):
            out.write(f"{HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            for piece in backend.stream(history):
                pieces.append(piece)
                out.write(sanitize(piece))
                out.flush()
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")
            history.pop()
            continue
        except ChatError as exc:
            out.write(f"\nerror: {exc}\n")
            history.pop()
            continue
        out.write("\n\n")
        history.append({"role": "assistant", "content": "".join(pieces)})


def run_chat(args: argparse.Namespace) -> int:
    """``mgpu chat``: open the backend, converse, close it.

    Args:
        args: parsed ``chat`` flags.
    """
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    options: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    backend: ChatBackend
    if args.url:
        backend = RemoteChat(args.url, args.api_key, args.model, options)
    else:
        from mgpu.sampling import SamplingParams

        SamplingParams(**options)  # refuse bad flags before loading anything
        backend = LocalChat(args, options)
    try:
        return converse(backend, args.system)
    finally:
        backend.close()


def _error_message(response: Any) -> str:
    try:
        return f"{response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"
