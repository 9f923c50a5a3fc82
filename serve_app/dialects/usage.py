"""Token counts read from an answer as the client receives it, in each dialect's shape: what a
key used. Streams are read chunk by chunk without parsing what cannot hold counts."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import orjson

from serve_app.core.schemas import Dialect
from serve_app.core.tokens import estimate_text
from serve_app.dialects.internal import LineReader, SSEReader

Counts = tuple[int, int]  # prompt, completion
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def counts_of(dialect: Dialect, doc: Any) -> Counts | None:
    """The counts in one answer object or stream event, if it carries any."""
    if not isinstance(doc, dict):
        return None
    if dialect == "ollama":
        if "prompt_eval_count" not in doc and "eval_count" not in doc:
            return None
        return _int(doc.get("prompt_eval_count")), _int(doc.get("eval_count"))
    holder = (
        doc.get("response")
        if doc.get("type") in ("response.completed", "response.incomplete")
        else doc
    )
    if not isinstance(holder, dict):
        return None
    usage = holder.get("usage")
    if doc.get("type") == "message_start":
        usage = (doc.get("message") or {}).get("usage")
    if not isinstance(usage, dict):
        return None
    if dialect == "openai":
        return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    return _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))


def cached_tokens(raw: bytes) -> int | None:
    """The prompt tokens an OpenAI-style answer or stream chunk says its server took from its
    prefix cache (`usage.prompt_tokens_details.cached_tokens`, vLLM with
    `--enable-prompt-tokens-details`); None where it says nothing. Searched, not parsed: JSON
    text escapes every quote inside a string, so only a key can match."""
    found = _CACHED.search(raw)
    return int(found[1]) if found else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _openai_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return _text(choice.get("text"))
    calls = delta.get("tool_calls")
    arguments = [
        _text(c.get("function", {}).get("arguments"))
        for c in (calls if isinstance(calls, list) else [])
        if isinstance(c, dict) and isinstance(c.get("function"), dict)
    ]
    return _text(delta.get("content")) + _text(delta.get("reasoning_content")) + "".join(arguments)


def generated_text(dialect: Dialect, doc: Any) -> str:
    """The text one stream event adds to the answer (its content, reasoning, tool arguments):
    what a stream cut short is charged by."""
    if not isinstance(doc, dict):
        return ""
    if dialect == "ollama":
        message = doc.get("message")
        said = message if isinstance(message, dict) else {}
        return "".join(
            _text(v) for v in (doc.get("response"), said.get("content"), said.get("thinking"))
        )
    if dialect == "openai":
        choices = doc.get("choices")
        return "".join(_openai_text(c) for c in (choices if isinstance(choices, list) else []))
    if dialect == "responses":
        return _text(doc.get("delta")) if str(doc.get("type")).endswith(".delta") else ""
    delta = doc.get("delta") if doc.get("type") == "content_block_delta" else None
    if not isinstance(delta, dict):
        return ""
    return "".join(_text(delta.get(k)) for k in ("text", "thinking", "partial_json"))


def _json(payload: bytes) -> Any:
    with contextlib.suppress(orjson.JSONDecodeError):
        return orjson.loads(payload)
    return None


class StreamMeter:
    """Reads the counts from a stream in the client's dialect, and what it relayed of the
    answer's text (so a stream cut short is charged what the client got). With `strip`,
    OpenAI's usage chunk (asked for by the router, not by the client) is taken out of what is
    relayed."""

    def __init__(self, dialect: Dialect, strip: bool) -> None:
        self.dialect = dialect
        self.strip = strip
        self.counts: Counts | None = None
        # The counts are the upstream's last (Anthropic's first ones hold the prompt's only).
        self.final = False
        self.relayed = 0  # tokens of the text relayed, by the router's estimate
        self._sse = SSEReader()
        self._lines = LineReader()
        self._held = b""  # an incomplete event, while stripping

    def _read(self, doc: Any) -> None:
        counts = counts_of(self.dialect, doc)
        if counts is not None:  # Anthropic sends input tokens first, output tokens later
            old = self.counts or (0, 0)
            self.counts = (max(old[0], counts[0]), max(old[1], counts[1]))
            self.final = self.final or doc.get("type") != "message_start"
        self.relayed += estimate_text(generated_text(self.dialect, doc))

    def feed(self, chunk: bytes) -> bytes:
        """The chunk as the client gets it (when stripping: whole events only, the rest held
        until it is complete)."""
        if self.dialect == "ollama":
            for line in self._lines.feed(chunk):
                self._read(_json(line))
            return chunk
        if self.strip:
            data = self._held + chunk.replace(b"\r\n", b"\n")
            *events, self._held = data.split(b"\n\n")
            kept = [e for e in events if not self._usage_only(e)]
            return b"".join(e + b"\n\n" for e in kept)
        for payload in self._sse.feed(chunk):
            self._read(_json(payload))
        return chunk

    def _usage_only(self, event: bytes) -> bool:
        """Reads an OpenAI event; True for the usage chunk (no choices)."""
        if not event.startswith(b"data: {"):
            return False
        doc = _json(event[6:])
        self._read(doc)
        return b'"usage"' in event and isinstance(doc, dict) and not doc.get("choices")

    def tail(self) -> bytes:
        """What was held back when the stream ended."""
        return self._held if self.strip else b""
