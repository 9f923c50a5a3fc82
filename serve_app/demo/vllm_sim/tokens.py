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

import asyncio
import json
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

    async def chat_prompt_async(self, messages: list[dict[str, Any]]) -> list[int]:
        """`chat_prompt` for a server: what takes long runs off the event loop."""

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

    async def chat_prompt_async(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.chat_prompt(messages)

    def encode(self, text: str) -> list[int]:
        return [_word_id(w) for w in text.split()]

    def decode_one(self, token_id: int) -> str:
        return f" t{token_id}"


# Pieces of a prompt cut for the tokenizer's cache (about this many characters each), and how
# many the cache keeps: a fleet benchmark's distinct text (~30 MB) fits.
PIECE_CHARS = 2048
CACHED_PIECES = 32_768


def cuts_before_words(spec: dict[str, Any]) -> bool:
    """Whether encoding a text gives the ids of its pieces, cut before any " <letter>" that
    follows a non-space, joined: so for a byte-level BPE with GPT-2's pre-tokenizing regex
    (every pre-token ends before such a space and the next starts with it), no normalizer and
    no added token holding a space (added tokens are split out first)."""
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and spec.get("model", {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and not any(" " in t.get("content", "") for t in spec.get("added_tokens", []))
    )


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of about `size` characters, each cut before a " <letter>" that follows
    a non-space (see cuts_before_words). A prompt that leads with another's text leads with the
    same pieces, up to the last cut before they differ."""
    start, end = 0, len(text)
    while end - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and not (
            cut + 1 < end and text[cut + 1].isalpha() and not text[cut - 1].isspace()
        ):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


class HfTokenizer:
    """A `tokenizers` tokenizer and the folder's chat template (rendered as transformers does:
    a sandboxed Jinja environment, trim_blocks and lstrip_blocks).

    Prompts that share a prefix (a conversation's turns, a shared document, the same trace sent
    to each router in turn) are tokenized piece by piece through a cache when the tokenizer
    allows it exactly (cuts_before_words; the e2e tiny model's does), so each distinct piece is
    tokenized once: ~20 ms for a 15,000-token prompt, ~1 ms once its pieces were seen. A
    server's prompts (chat_prompt_async) have their unseen pieces tokenized on one worker
    thread (HF's batch call lets go of the GIL), so the step loop never waits on them and the
    tokenizing takes at most one core."""

    def __init__(self, folder: Path) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer as Fast

        spec_text = (folder / "tokenizer.json").read_text()
        self._fast = Fast.from_str(spec_text)
        self._by_pieces = cuts_before_words(json.loads(spec_text))
        self._pieces: OrderedDict[str, list[int]] = OrderedDict()
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
        self._worker: ThreadPoolExecutor | None = None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # The batch call, not `encode`: only it releases the GIL while the Rust code runs.
        return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]

    def _render(self, messages: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """The prompt's text in pieces (one when the tokenizer cannot be cut), and those
        not cached."""
        text = self._template.render(
            messages=_messages(messages), add_generation_prompt=True, **self._specials
        )
        if not self._by_pieces:
            return [text], [text]
        cut = list(pieces(text))
        return cut, list(dict.fromkeys(p for p in cut if p not in self._pieces))

    def _joined(self, cut: list[str], missing: list[str], encoded: list[list[int]]) -> list[int]:
        if not self._by_pieces:
            return encoded[0]
        cache = self._pieces
        cache.update(zip(missing, encoded, strict=True))
        out: list[int] = []
        for piece in cut:
            cache.move_to_end(piece)
            out += cache[piece]
        while len(cache) > CACHED_PIECES:
            cache.popitem(last=False)
        return out

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        cut, missing = self._render(messages)
        return self._joined(cut, missing, self._encode(missing) if missing else [])

    async def chat_prompt_async(self, messages: list[dict[str, Any]]) -> list[int]:
        cut, missing = self._render(messages)
        encoded: list[list[int]] = []
        if missing:
            self._worker = self._worker or ThreadPoolExecutor(1, "tokenize")
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(self._worker, self._encode, missing)
        return self._joined(cut, missing, encoded)

    def encode(self, text: str) -> list[int]:
        return self._fast.encode_batch([text])[0].ids

    def decode_one(self, token_id: int) -> str:
        return self._fast.decode([token_id])


def load(folder: Path | None) -> Tokenizer:
    return HfTokenizer(folder) if folder is not None else SimpleTokenizer()
