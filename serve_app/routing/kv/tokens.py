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

import json
import zlib
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from serve_app.routing.kv.index import chain_keys, root_key

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


class HfTokenizer:
    """A `tokenizers` tokenizer and the folder's chat template, rendered as transformers does."""

    def __init__(self, folder: Path) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer as Fast

        self._fast = Fast.from_file(str(folder / "tokenizer.json"))
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

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None
    ) -> list[int]:
        return self._fast.encode(self.render(messages, tools), add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        return self._fast.encode(text).ids

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


def prompt_keys(token_ids: list[int], block_size: int, lora: str | None = None) -> list[int]:
    """The block keys of a prompt on an engine with `block_size` (and the adapter serving it):
    what the index holds for each provider that cached these tokens."""
    return chain_keys(token_ids, block_size, root_key(lora))
