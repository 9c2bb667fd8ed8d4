"""JSONL training data: three formats, each turned into token ids and a loss mask.

One JSON object per line, in one of three shapes (formats may be mixed within a file):

``{"text": "..."}``
    plain text; the loss covers every token.
``{"prompt": "...", "completion": "..."}``
    the loss covers the completion (and the end-of-text token after it) only.
``{"messages": [{"role": "user", "content": "..."}, ...]}``
    rendered with the tokenizer's chat template; the loss covers the assistant turns only
    (their content and the template's end-of-turn marker).

The whole file is read and tokenized before training starts: every bad line is reported as
``file:line: what is wrong`` and nothing trains on half-read data. Samples longer than
``--max_seq_length`` are cut at the end. Batches are padded to their longest sample (padding
positions have ``attention_mask`` 0 and label -100); samples are not packed, so no attention ever
crosses from one sample into another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mgpu.errors import MgpuError

#: Label value the loss ignores (``torch.nn.CrossEntropyLoss``'s ``ignore_index``).
IGNORE_INDEX = -100
#: Most bad lines listed in one error message.
MAX_REPORTED = 20


class DatasetError(MgpuError):
    """A dataset that cannot be trained on: missing, empty or with bad lines."""


@dataclass(frozen=True)
class Sample:
    """One tokenized training example.

    Args:
        index: the example's position in the file (0-based).
        input_ids: token ids of the whole example.
        labels: the token id where the loss counts, ``IGNORE_INDEX`` elsewhere.
    """

    index: int
    input_ids: list[int]
    labels: list[int]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _text_sample(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    ids = _encode(tokenizer, record["text"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids, list(ids)


def _completion_sample(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    prompt = _encode(tokenizer, record["prompt"])
    if tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id, *prompt]
    completion = _encode(tokenizer, record["completion"])
    if tokenizer.eos_token_id is not None:
        completion = [*completion, tokenizer.eos_token_id]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _chat_sample(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    messages = record["messages"]
    full = _render(tokenizer, messages, False)
    # Character spans of the assistant turns: from the end of the generation prompt before the
    # turn to the end of the conversation rendered up to and including it.
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        before = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(before):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        spans.append((start, len(before)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (lo, hi) in enumerate(enc["offset_mapping"]):
        if hi > lo and any(s <= lo and hi <= e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def _check_record(record: Any) -> str | None:
    """What is wrong with one parsed line, or ``None``."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return f"messages[{j}] needs a string 'role'"
            if not isinstance(m.get("content"), str):
                return f"messages[{j}] needs a string 'content'"
        if not any(m["role"] == "assistant" for m in messages):
            return "'messages' has no assistant turn to learn from"
        return None
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                return f"'{key}' must be a string (prompt/completion format)"
        if not record["completion"]:
            return "'completion' is empty"
        return None
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            return "'text' must be a non-empty string"
        return None
    return f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {sorted(record)})"


def tokenize_record(
    tokenizer: Any, record: dict[str, Any], max_seq_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one valid record, cut to ``max_seq_length``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast, for the chat format's offsets).
        record: a parsed line that :func:`_check_record` accepts.
        max_seq_length: most tokens kept.
    """
    if "messages" in record:
        ids, labels = _chat_sample(tokenizer, record)
    elif "prompt" in record:
        ids, labels = _completion_sample(tokenizer, record)
    else:
        ids, labels = _text_sample(tokenizer, record)
    return ids[:max_seq_length], labels[:max_seq_length]


def load_jsonl(path: str | Path, tokenizer: Any, max_seq_length: int) -> list[Sample]:
    """Read, validate and tokenize a whole JSONL file.

    Args:
        path: the file.
        tokenizer: the model's tokenizer.
        max_seq_length: most tokens per sample.

    Raises:
        DatasetError: the file is missing or empty, or lines are bad (all of them listed, as
            ``file:line: problem``, up to :data:`MAX_REPORTED`).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    samples: list[Sample] = []
    errors: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            problem = _check_record(record)
            if problem is None:
                try:
                    ids, labels = tokenize_record(tokenizer, record, max_seq_length)
                except ValueError as exc:
                    problem = str(exc)
                else:
                    if len(ids) < 2 or all(x == IGNORE_INDEX for x in labels[1:]):
                        problem = f"no token to learn from within --max_seq_length {max_seq_length}"
            if problem is not None:
                errors.append(f"{path}:{lineno}: {problem}")
                continue
            samples.append(Sample(len(samples), ids, labels))
    if errors:
        shown = errors[:MAX_REPORTED]
        more = len(errors) - len(shown)
        tail = f"\n... and {more} more bad lines" if more else ""
        raise DatasetError(f"{len(errors)} bad line(s) in {path}:\n" + "\n".join(shown) + tail)
    if not samples:
        raise DatasetError(f"dataset is empty: {path}")
    return samples


class SampleDataset(torch.utils.data.Dataset):
    """A list of samples as a map-style dataset (what the data loader and its sampler take)."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def pad_collate(samples: list[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sample, on the right.

    Args:
        samples: the batch.
        pad_token_id: id written into padding positions (their label is ``IGNORE_INDEX``).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: each (batch, longest); ``index``: (batch,).
    """
    longest = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)  # (batch, longest)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (batch, longest)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (batch, longest)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        attention_mask[row, :n] = 1
    index = torch.tensor([s.index for s in samples], dtype=torch.long)  # (batch,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": index,
    }
