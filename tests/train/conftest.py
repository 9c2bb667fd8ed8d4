"""Tiny JSONL datasets in each format, and a fresh Accelerate state for each in-process run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SENTENCES = [
    "The cat sat on the mat and looked at the door.",
    "A small model learns short sentences quickly.",
    "Tensor parallelism splits each weight matrix over devices.",
    "The dog ran across the green field to the river.",
    "Every process takes its share of the global batch.",
    "Gradients are averaged before the optimizer step.",
    "The train left the station at nine in the morning.",
    "She wrote the answer on the board in blue ink.",
]


def records(n: int) -> list[dict[str, Any]]:
    """``n`` records cycling through the three formats."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        s = SENTENCES[i % len(SENTENCES)]
        if i % 3 == 0:
            out.append({"text": s})
        elif i % 3 == 1:
            out.append({"prompt": f"Repeat: {s[:12]}", "completion": s})
        else:
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Say sentence {i % len(SENTENCES)}."},
                        {"role": "assistant", "content": s},
                    ]
                }
            )
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write one JSON value per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A 16-sample mixed-format training file."""
    return write_jsonl(tmp_path / "train.jsonl", records(16))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """In-process training on one torch thread: on a loaded machine, several are much slower
    (see docs/benchmarks.md, training speed)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons; each in-process run starts from none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
