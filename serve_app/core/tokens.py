"""Prompt-size estimate for `input_size` eligibility, without a tokenizer.

The rule (documented in the README): ASCII text counts one token per 4 characters, rounded up;
every non-ASCII character counts one token (CJK and most scripts tokenize near 1 char/token);
each chat message adds 4 tokens of framing; a non-text content part (an image, audio) counts 256;
tool definitions count their JSON size / 4. Token-id prompts count their length exactly.
The estimate errs high for non-Latin text so a request is not sent where it cannot fit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson

# ASCII characters per token: the one estimate of text size the router uses (prompts here,
# answers billed by size, text prefix blocks turned into tokens).
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
NON_TEXT_PART = 256


def chars_to_tokens(chars: int) -> int:
    """Tokens of `chars` ASCII characters, rounded up."""
    return -(-chars // CHARS_PER_TOKEN)


def estimate_text(text: str) -> int:
    if text.isascii():
        return chars_to_tokens(len(text))
    # The ASCII characters, counted by the codec in one C pass (no loop per character).
    non_ascii = len(text) - len(text.encode("ascii", "ignore"))
    return chars_to_tokens(len(text) - non_ascii) + non_ascii


def _content(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_text(content)
    total = 0
    for part in content:
        text = part.get("text") if isinstance(part, dict) else getattr(part, "text", None)
        total += estimate_text(text) if isinstance(text, str) else NON_TEXT_PART
    return total


def estimate_chat(messages: Sequence[Any], tools: Sequence[Any] | None) -> int:
    total = sum(MESSAGE_OVERHEAD + _content(m.content) for m in messages)
    if tools:
        try:
            size = len(orjson.dumps(list(tools)))
        except TypeError:  # integers beyond 64 bits: the standard encoder takes any size
            size = len(json.dumps(list(tools)))
        total += chars_to_tokens(size)
    return total


def estimate_sequences(value: str | list[Any]) -> int:
    """The largest single sequence of a prompt/input that may be a batch of several."""
    if isinstance(value, str):
        return estimate_text(value)
    if not value:
        return 0
    if isinstance(value[0], int):
        return len(value)
    return max(estimate_text(v) if isinstance(v, str) else len(v) for v in value)
