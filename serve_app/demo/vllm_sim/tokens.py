"""The prompt as the real server sees it: the chat template rendered, then tokenized.

Given a Hugging Face tokenizer folder (`tokenizer.json` and `tokenizer_config.json` with its
`chat_template`, e.g. the e2e tiny model's), it renders and tokenizes as vLLM does (the template
through Jinja with HF's settings, chat prompts without added special tokens), so a router that
tokenizes sees the same ids. Without one, a simple tokenizer: the tiny model's template
(`role: content` lines, then `assistant: `), one token per whitespace-separated word (`t<id>`
is token <id>, any other word a hash of it); fast enough for prompts of tens of thousands of
tokens at a fleet's rate.
"""

from __future__ import annotations

import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

SIMPLE_VOCAB = 32_000
SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class Tokenizer(Protocol):
    vocab_size: int

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode_one(self, token_id: int) -> str: ...


def _text(content: Any) -> str:
    """A message's content: a string, or the text of its parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "content": _text(m.get("content"))} for m in messages]


@lru_cache(maxsize=1 << 20)
def _word_id(word: str) -> int:
    if word[:1] == "t" and word[1:].isdigit() and int(word[1:]) < SIMPLE_VOCAB:
        return int(word[1:])
    return zlib.crc32(word.encode()) % SIMPLE_VOCAB


@lru_cache(maxsize=4096)
def _encode_cached(text: str) -> tuple[int, ...]:
    return tuple(_word_id(w) for w in text.split())


class SimpleTokenizer:
    vocab_size = SIMPLE_VOCAB

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Words never span a line, so each message is tokenized alone (and a repeated one,
        such as a shared document or tool prompt, once)."""
        out: list[int] = []
        for m in _messages(messages):
            out.append(_word_id(f"{m['role']}:"))
            out.extend(_encode_cached(m["content"]))
        out.append(_word_id("assistant:"))
        return out

    def encode(self, text: str) -> list[int]:
        return [_word_id(w) for w in text.split()]

    def decode_one(self, token_id: int) -> str:
        return f" t{token_id}"


class HfTokenizer:
    """A `tokenizers` tokenizer and the folder's chat template (rendered as transformers does:
    a sandboxed Jinja environment, trim_blocks and lstrip_blocks)."""

    def __init__(self, folder: Path) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer as Fast

        self._fast = Fast.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        # Recent transformers save the template beside the config rather than in it.
        beside = folder / "chat_template.jinja"
        template = beside.read_text() if beside.exists() else config.get("chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(template or SIMPLE_TEMPLATE)
        self._specials = {
            k: config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.vocab_size = self._fast.get_vocab_size()
        # The prompts of the last requests by their text: a router that renders through the
        # server (vllm-router's kv_aware) sends each prompt twice, to render and to answer.
        self._encode_chat = lru_cache(maxsize=256)(self._encode_text)

    def _encode_text(self, text: str) -> tuple[int, ...]:
        return tuple(self._fast.encode(text, add_special_tokens=False).ids)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self._template.render(
            messages=_messages(messages), add_generation_prompt=True, **self._specials
        )
        return list(self._encode_chat(text))

    def encode(self, text: str) -> list[int]:
        return self._fast.encode(text).ids

    def decode_one(self, token_id: int) -> str:
        return self._fast.decode([token_id])


def load(folder: Path | None) -> Tokenizer:
    return HfTokenizer(folder) if folder is not None else SimpleTokenizer()
