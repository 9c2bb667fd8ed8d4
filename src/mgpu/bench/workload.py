"""The requests of a benchmark: prompts of chosen lengths and how many tokens each asks for.

Lengths are ``fixed`` (every request the same), ``uniform`` over a range, or read from a JSONL file
with one request per line. A server's tokenizer is not known to the client, so synthetic prompts
are made of short common English words, each one token in the usual BPE vocabularies; the server's
own count comes back in the usage chunk and is what the report uses.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mgpu.errors import ConfigError

#: Words that are one token each in Llama, GPT-2 and Qwen vocabularies (with a leading space).
_WORDS = (
    "the", "of", "and", "to", "in", "is", "for", "on", "that", "by", "with", "as", "at", "from",
    "it", "be", "this", "are", "or", "an", "was", "not", "but", "all", "can", "has", "have", "one",
    "two", "new", "more", "time", "day", "year", "way", "man", "work", "life", "home", "world",
    "city", "water",
)  # fmt: skip


@dataclass(frozen=True)
class BenchRequest:
    """One request of a run.

    Attributes:
        prompt: the text sent as ``prompt`` (or as the one user message of a chat).
        max_tokens: tokens asked for (with ``ignore_eos`` so that servers honouring it give all).
        prompt_words: words in a synthetic prompt (0 for a prompt read from a file).
    """

    prompt: str
    max_tokens: int
    prompt_words: int = 0


def parse_lengths(spec: str) -> tuple[int, int]:
    """A length spec: ``N`` (fixed) or ``LO-HI`` / ``LO:HI`` (uniform, inclusive).

    Args:
        spec: the flag's value, e.g. ``128`` or ``64-256``.
    """
    text = spec.replace(":", "-")
    try:
        parts = [int(x) for x in text.split("-")]
    except ValueError:
        raise ConfigError(f"a length is N or LO-HI, got {spec!r}") from None
    if len(parts) > 2:
        raise ConfigError(f"a length is N or LO-HI, got {spec!r}")
    lo, hi = parts[0], parts[-1]
    if lo < 1 or hi < lo:
        raise ConfigError(f"a length is N >= 1 or LO-HI with 1 <= LO <= HI, got {spec!r}")
    return lo, hi


def synthetic_prompt(num_words: int, rng: random.Random, prefix: str = "") -> str:
    """A prompt of ``num_words`` random common words after ``prefix``."""
    return prefix + " ".join(rng.choice(_WORDS) for _ in range(num_words))


def synthetic_requests(
    num_prompts: int,
    prompt_len: str,
    output_len: str,
    seed: int = 0,
    shared_prefix_words: int = 0,
) -> list[BenchRequest]:
    """``num_prompts`` requests with lengths drawn from the specs (reproducible for a seed).

    Args:
        num_prompts: how many requests.
        prompt_len: prompt words, ``N`` or ``LO-HI``.
        output_len: tokens asked for, ``N`` or ``LO-HI``.
        seed: seed of the lengths and words.
        shared_prefix_words: words of one common prefix put before every prompt (a system prompt,
            which a prefix cache serves once computed).
    """
    rng = random.Random(seed)
    (plo, phi), (olo, ohi) = parse_lengths(prompt_len), parse_lengths(output_len)
    prefix = synthetic_prompt(shared_prefix_words, rng) + " " if shared_prefix_words else ""
    out = []
    for _ in range(num_prompts):
        words = rng.randint(plo, phi)
        out.append(BenchRequest(synthetic_prompt(words, rng, prefix), rng.randint(olo, ohi), words))
    return out


def file_requests(
    path: Path, num_prompts: int | None, output_len: str | None
) -> list[BenchRequest]:
    """Requests from a JSONL file: ``{"prompt": ..., "max_tokens": ...}`` per line.

    ``max_tokens`` may be left out of a line when ``output_len`` is given (it then fills in; a
    range is drawn per line). The file's lines are cycled when ``num_prompts`` exceeds them.

    Args:
        path: the file.
        num_prompts: how many requests (default: one per line).
        output_len: tokens asked for where a line has no ``max_tokens``.
    """
    rng = random.Random(0)
    lengths = parse_lengths(output_len) if output_len else None
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected an object with a 'prompt'") from None
        max_tokens = row.get("max_tokens")
        if max_tokens is None:
            if lengths is None:
                raise ConfigError(f"{path}:{number}: no max_tokens and no --output-len given")
            max_tokens = rng.randint(*lengths)
        rows.append(BenchRequest(str(prompt), int(max_tokens)))
    if not rows:
        raise ConfigError(f"{path} holds no requests")
    count = num_prompts or len(rows)
    return [rows[i % len(rows)] for i in range(count)]
