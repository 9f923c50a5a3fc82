"""Token counts read from an answer as the client receives it, in each dialect's shape: what a
key used. Streams are read chunk by chunk without parsing what cannot hold counts."""

from __future__ import annotations

from typing import Any

import orjson

from serve_app.core.schemas import Dialect
from serve_app.dialects.internal import LineReader, SSEReader

Counts = tuple[int, int]  # prompt, completion


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


class StreamMeter:
    """Reads the counts from a stream in the client's dialect. With `strip`, OpenAI's usage
    chunk (asked for by the router, not by the client) is taken out of what is relayed."""

    def __init__(self, dialect: Dialect, strip: bool) -> None:
        self.dialect = dialect
        self.strip = strip
        self.counts: Counts | None = None
        self._sse = SSEReader()
        self._lines = LineReader()
        self._held = b""  # an incomplete event, while stripping

    def _seen(self, counts: Counts | None) -> None:
        if counts is not None:  # Anthropic sends input tokens first, output tokens later
            old = self.counts or (0, 0)
            self.counts = (max(old[0], counts[0]), max(old[1], counts[1]))

    def feed(self, chunk: bytes) -> bytes:
        """The chunk as the client gets it (when stripping: whole events only, the rest held
        until it is complete)."""
        if self.dialect == "ollama":
            for line in self._lines.feed(chunk):
                if b'"done":true' in line.replace(b" ", b""):
                    self._seen(counts_of("ollama", orjson.loads(line)))
            return chunk
        if self.strip:
            data = self._held + chunk.replace(b"\r\n", b"\n")
            *events, self._held = data.split(b"\n\n")
            kept = [e for e in events if not self._usage_only(e)]
            return b"".join(e + b"\n\n" for e in kept)
        for payload in self._sse.feed(chunk):
            if b'"usage"' in payload:
                self._seen(counts_of(self.dialect, orjson.loads(payload)))
        return chunk

    def _usage_only(self, event: bytes) -> bool:
        """Reads an OpenAI event's counts; True for the usage chunk (no choices)."""
        if b'"usage"' not in event or not event.startswith(b"data: {"):
            return False
        doc = orjson.loads(event[6:])
        self._seen(counts_of(self.dialect, doc))
        return not doc.get("choices")

    def tail(self) -> bytes:
        """What was held back when the stream ended."""
        return self._held if self.strip else b""
