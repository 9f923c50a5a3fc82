"""The prompt as the server sees it: the chat template rendered, tokenized, cut into block keys.

One implementation for the router (which must compute the ids the engine will cache) and the
simulated vLLM (which must produce them), so the two cannot drift.

Given a Hugging Face tokenizer folder (`tokenizer.json`, `tokenizer_config.json`, and the chat
template in `chat_template.jinja` or the config's `chat_template`), it renders and tokenizes as
vLLM does: a message's text parts joined by newlines, the template through Jinja with
transformers' settings (sandboxed, trim_blocks, lstrip_blocks, loop controls, its `tojson`,
`raise_exception` and `strftime_now`, the special tokens as variables), chat prompts without
added special tokens, completion prompts with them. Without a folder, a simple tokenizer: the
tiny model's template (`role: content` lines, then `assistant: `), one token per
whitespace-separated word (`t<id>` is token <id>, any other word a hash of it); fast enough for
prompts of tens of thousands of tokens at a fleet's rate.

`tokenizer_for` loads a folder once per process (models share nothing else); `prompt_keys` cuts
a request into the block keys routing.kv.index holds for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import orjson

from serve_app.routing.kv.index import chain_keys, root_key

log = logging.getLogger("ray.serve")

SIMPLE_VOCAB = 32_000
SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class Tokenizer(Protocol):
    vocab_size: int

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[int]: ...

    async def chat_prompt_async(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[int]:
        """`chat_prompt` for a server: what takes long runs off the event loop."""

    def encode(self, text: str) -> list[int]: ...

    def decode_one(self, token_id: int) -> str: ...


def _text(content: Any) -> str:
    """A message's content: a string, or its text parts joined by newlines (vLLM's "string"
    content format)."""
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
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

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[int]:
        """Words never span a line, so each message is tokenized alone (and a repeated one,
        such as a shared document or tool prompt, once). Tools are not in its template."""
        out: list[int] = []
        for m in _messages(messages):
            out.append(_word_id(f"{m['role']}:"))
            out.extend(_encode_cached(m["content"]))
        out.append(_word_id("assistant:"))
        return out

    async def chat_prompt_async(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[int]:
        return self.chat_prompt(messages, tools)

    def encode(self, text: str) -> list[int]:
        return [_word_id(w) for w in text.split()]

    def decode_one(self, token_id: int) -> str:
        return f" t{token_id}"


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_source(folder: Path, config: Mapping[str, Any]) -> str:
    """The folder's chat template: `chat_template.jinja`, else the config's (a string, or
    transformers' list of named templates, whose `default` is the chat one)."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else SIMPLE_TEMPLATE


def _special(value: Any) -> Any:
    """A special token as tokenizer_config.json gives it (a string or an AddedToken map)."""
    return value.get("content") if isinstance(value, dict) else value


# Pieces of a prompt cut for the tokenizer's cache (about this many characters each), and how
# many the cache keeps: a fleet benchmark's distinct text (~30 MB) fits.
PIECE_CHARS = 2048
CACHED_PIECES = 32_768


def cuts_before_words(spec: Mapping[str, Any]) -> bool:
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


def _joined(pieces: list[tuple[str, list[int]]]) -> list[int]:
    out: list[int] = []
    for _, ids in pieces:
        out += ids  # a list's extend: several times faster than a comprehension over the ids
    return out


class HfTokenizer:
    """A `tokenizers` tokenizer and the folder's chat template, rendered as transformers does.

    Prompts that share a prefix (a conversation's turns, a shared document, the same trace sent
    to each router in turn) are tokenized piece by piece through a cache when the tokenizer
    allows it exactly (cuts_before_words; the e2e tiny model's does), so each distinct piece is
    tokenized once: ~20 ms for a 15,000-token prompt, ~1 ms once its pieces were seen. A
    server's prompts (chat_prompt_async) have their unseen pieces tokenized on one worker
    thread (HF's batch call lets go of the GIL), so its event loop never waits on them and the
    tokenizing takes at most one core.
    """

    def __init__(self, folder: Path) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer as Fast

        spec_text = (folder / "tokenizer.json").read_text()
        self._fast = Fast.from_str(spec_text)
        self._by_pieces = cuts_before_words(json.loads(spec_text))
        self._pieces: OrderedDict[str, list[int]] = OrderedDict()
        # (key of the last full block before a piece, the ids after it, block size, piece) ->
        # (the piece's full blocks' keys, the ids after its last full block): chat_keys_async
        self._chains: OrderedDict[
            tuple[int, tuple[int, ...], int, str], tuple[tuple[int, ...], tuple[int, ...]]
        ] = OrderedDict()
        self._worker: ThreadPoolExecutor | None = None
        config = json.loads((folder / "tokenizer_config.json").read_text())
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
        self._template = env.from_string(_template_source(folder, config))
        self._specials = {k: _special(config[k]) for k in _SPECIAL_TOKENS if k in config}
        self.vocab_size = self._fast.get_vocab_size()

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> str:
        return self._template.render(
            messages=_messages(messages),
            tools=tools or None,
            add_generation_prompt=True,
            **self._specials,
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # The batch call, not `encode`: only it releases the GIL while the Rust code runs.
        return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]

    def _cut(self, text: str) -> tuple[list[str], list[str]]:
        """The text in pieces (one when the tokenizer cannot be cut), and those not cached."""
        if not self._by_pieces:
            return [text], [text]
        cut = list(pieces(text))
        return cut, list(dict.fromkeys(p for p in cut if p not in self._pieces))

    def _ids(
        self, cut: list[str], missing: list[str], encoded: list[list[int]]
    ) -> list[tuple[str, list[int]]]:
        """Each piece with its ids (the cache's own lists: not to be changed)."""
        if not self._by_pieces:
            return [(cut[0], encoded[0])]
        cache = self._pieces
        cache.update(zip(missing, encoded, strict=True))
        out = []
        for piece in cut:
            cache.move_to_end(piece)
            out.append((piece, cache[piece]))
        while len(cache) > CACHED_PIECES:
            cache.popitem(last=False)
        return out

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[int]:
        cut, missing = self._cut(self.render(messages, tools))
        return _joined(self._ids(cut, missing, self._encode(missing) if missing else []))

    async def _pieces_async(
        self, messages: list[dict[str, Any]], tools: list[Any] | None
    ) -> list[tuple[str, list[int]]]:
        cut, missing = self._cut(self.render(messages, tools))
        encoded: list[list[int]] = []
        if missing:
            self._worker = self._worker or ThreadPoolExecutor(1, "tokenize")
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(self._worker, self._encode, missing)
        return self._ids(cut, missing, encoded)

    async def chat_prompt_async(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[int]:
        return _joined(await self._pieces_async(messages, tools))

    async def chat_keys_async(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        block_size: int,
        lora: str | None = None,
    ) -> tuple[list[int], int]:
        """A chat's block keys (as prompt_keys gives them) and its token count. A piece's keys
        depend only on what came before it through the last full block's key and the ids
        after it, so they are kept per (that key, those ids, the piece): a prompt whose pieces
        were seen after the same prefix costs a lookup per piece, not a hash per block."""
        keys: list[int] = []
        parent, tail, count = root_key(lora), (), 0
        chains = self._chains
        for piece, ids in await self._pieces_async(messages, tools):
            count += len(ids)
            at = (parent, tail, block_size, piece)
            chained = chains.get(at)
            if chained is None:
                data = [*tail, *ids]
                full = len(data) - len(data) % block_size
                made = chain_keys(data[:full], block_size, parent)
                chained = chains[at] = (tuple(made), tuple(data[full:]))
                if len(chains) > CACHED_PIECES:
                    chains.popitem(last=False)
            else:
                chains.move_to_end(at)
            keys += chained[0]
            parent, tail = chained[0][-1] if chained[0] else parent, chained[1]
        return keys, count

    def encode(self, text: str) -> list[int]:
        return self._fast.encode_batch([text])[0].ids

    def decode_one(self, token_id: int) -> str:
        return self._fast.decode([token_id])


def load(folder: Path | None) -> Tokenizer:
    return HfTokenizer(folder) if folder is not None else SimpleTokenizer()


@lru_cache(maxsize=32)
def tokenizer_for(folder: str) -> HfTokenizer:
    """A model's tokenizer, loaded once per process (tens of MB each; a handful of models)."""
    return HfTokenizer(Path(folder))


def prompt_tokens(tokenizer: Tokenizer, body: Mapping[str, Any]) -> list[int]:
    """A chat (`messages`, `tools`) or completion (`prompt`: text or token ids) request's
    prompt ids; [] when it has neither in a form the server tokenizes alone."""
    messages = body.get("messages")
    if isinstance(messages, list):
        tools = body.get("tools")
        return tokenizer.chat_prompt(messages, tools if isinstance(tools, list) else None)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    return []


class PromptKeys(NamedTuple):
    """How the ingress cuts one kv_aware model's requests: its tokenizer folder, its servers'
    block size and, for a LoRA adapter, its name (the first block's key is seeded with it)."""

    folder: str
    block_size: int
    lora: str | None = None

    async def of(self, body: bytes) -> tuple[list[int], int]:
        """The block keys of a raw request body's prompt and its token count; ([], 0) when it
        has none the tokenizer can render (the request is then routed by load alone)."""
        try:
            doc = orjson.loads(body)
            if not isinstance(doc, dict):
                return [], 0
            tokenizer = tokenizer_for(self.folder)
            messages, tools = doc.get("messages"), doc.get("tools")
            if isinstance(messages, list):  # tokenized off the event loop, keys by piece
                tools = tools if isinstance(tools, list) else None
                return await tokenizer.chat_keys_async(messages, tools, self.block_size, self.lora)
            ids = prompt_tokens(tokenizer, doc)
        except Exception as exc:  # a template refusing the conversation must not fail it
            log.info("prompt not tokenized for kv_aware", extra={"reason": type(exc).__name__})
            return [], 0
        return prompt_keys(ids, self.block_size, self.lora), len(ids)


def prompt_keys(token_ids: list[int], block_size: int, lora: str | None = None) -> list[int]:
    """The block keys of a prompt on an engine with `block_size` (and the adapter serving it):
    what the index holds for each provider that cached these tokens."""
    return chain_keys(token_ids, block_size, root_key(lora))
