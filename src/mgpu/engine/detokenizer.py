"""Incremental detokenisation that never emits half a multi-byte character.

Decoding token by token breaks words whose bytes span several tokens (a Chinese character, an emoji)
and drops the leading spaces some tokenizers encode in the next token. Instead, each step decodes a
short window: the tokens already emitted (``prefix_offset:read_offset``) and the same window plus
the
new tokens; the difference is the new text. While the tail decodes to the replacement character
(an incomplete UTF-8 sequence), nothing is emitted and the window grows.
"""

from __future__ import annotations

from typing import Any

from mgpu.engine.sequence import Sequence

REPLACEMENT_CHAR = "\ufffd"


def detokenize_incrementally(tokenizer: Any, seq: Sequence, flush: bool = False) -> str:
    """Append the text of ``seq``'s newest tokens to ``seq.output_text``; return the new text.

    Args:
        tokenizer: a Hugging Face tokenizer.
        seq: the sequence; its offsets are advanced.
        flush: emit whatever is pending even if it ends mid-character (the sequence has finished).
    """
    ids = seq.all_token_ids
    skip = seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not flush):
        return ""
    delta = full[len(prefix) :]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.output_text += delta
    return delta
