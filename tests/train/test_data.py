"""Dataset formats: each one's loss mask token by token, and bad files reported before training."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mgpu.models.loader import demo_model_path
from mgpu.train.data import IGNORE_INDEX, DatasetError, load_jsonl, pad_collate
from tests.train.conftest import write_jsonl

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(demo_model_path())


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_trains_on_every_token(tok, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "The cat sat on the mat."}])
    (s,) = load_jsonl(path, tok, 512)
    expected = [tok.bos_token_id, *enc(tok, "The cat sat on the mat."), tok.eos_token_id]
    assert s.input_ids == expected
    assert s.labels == expected


def test_prompt_completion_masks_the_prompt(tok, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Question: two plus two?", "completion": " Four."}]
    )
    (s,) = load_jsonl(path, tok, 512)
    prompt = [tok.bos_token_id, *enc(tok, "Question: two plus two?")]
    completion = [*enc(tok, " Four."), tok.eos_token_id]
    assert s.input_ids == prompt + completion
    assert s.labels == [M] * len(prompt) + completion


def test_messages_train_on_assistant_turns_only(tok, tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    (s,) = load_jsonl(path, tok, 512)
    # The demo template by hand: masked pieces and learned pieces alternate.
    pieces = [
        (
            "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\nName a colour<|im_end|>\n<|im_start|>assistant\n", False),
        ("Blue.<|im_end|>\n", True),
    ]
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        piece = enc(tok, text)
        ids += piece
        labels += piece if learned else [M] * len(piece)
    assert s.input_ids == ids
    assert s.labels == labels
    assert tok.convert_tokens_to_ids("<|im_end|>") in [x for x in s.labels if x != M]


def test_long_samples_are_cut(tok, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 100}])
    (s,) = load_jsonl(path, tok, 16)
    assert len(s.input_ids) == len(s.labels) == 16


def test_padding_masks_pad_positions(tok, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c d e f"}, {"text": "a"}])
    a, b = load_jsonl(path, tok, 512)
    batch = pad_collate([a, b], tok.pad_token_id)
    n = len(b.input_ids)
    assert batch["input_ids"].shape == (2, len(a.input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (len(a.input_ids) - n)
    assert batch["labels"][1, n:].eq(M).all()
    assert batch["index"].tolist() == [0, 1]


def test_bad_lines_are_reported_with_file_and_line(tok, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "fine"}\n'
        "{not json\n"
        '{"prompt": "p"}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
        "\n"
        '{"title": "x"}\n'
        "[1, 2]\n"
        '{"messages": [{"role": "assistant"}]}\n'
    )
    with pytest.raises(DatasetError) as err:
        load_jsonl(path, tok, 512)
    msg = str(err.value)
    assert "6 bad line(s)" in msg
    assert f"{path}:2: not valid JSON" in msg
    assert f"{path}:3: 'completion' must be a string" in msg
    assert f"{path}:4: 'messages' has no assistant turn" in msg
    assert f"{path}:6: no 'text', 'prompt'/'completion' or 'messages' key" in msg
    assert f"{path}:7: expected a JSON object, got list" in msg
    assert f"{path}:8: messages[0] needs a string 'content'" in msg
    assert f"{path}:1:" not in msg


def test_completion_cut_away_entirely_is_an_error(tok, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 50, "completion": "end"}])
    with pytest.raises(DatasetError, match=r"d.jsonl:1: no token to learn from"):
        load_jsonl(path, tok, 8)


def test_missing_and_empty_datasets(tok, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset not found"):
        load_jsonl(tmp_path / "nope.jsonl", tok, 512)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="dataset is empty"):
        load_jsonl(tmp_path / "empty.jsonl", tok, 512)
