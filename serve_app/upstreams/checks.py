"""What an upstream's answer must be before any of it is relayed or translated (pure).

The router asks every upstream for `Accept-Encoding: identity`, but one that compresses anyway
is decoded here, in bounded pieces (a small gzip body cannot make a large buffer at once). A
unary answer is held whole, so it has a size bound. A stream is handed on in whole frames (SSE
events; NDJSON lines for Ollama), each checked against its wire format and a size bound, and it
must end with its wire's terminal frame. Whatever breaks a rule is a BadUpstream: a 502 before
the answer's first byte, the dialect's error event after it, and a failure of the provider.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import orjson

from serve_app.core.errors import BadUpstream
from serve_app.core.schemas import Dialect

# The largest piece a compressed answer is decoded into at once.
DECODED_PIECE = 64 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# A stream's last frame in each upstream wire format (an error frame ends it too).
_TERMINAL_TYPES: dict[Dialect, frozenset[str]] = {
    "responses": frozenset({"response.completed", "response.incomplete", "response.failed"}),
    "anthropic": frozenset({"message_stop"}),
}
_SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """An answer of the right wire format whose content a translation cannot read (a field of
    the wrong type) is a BadUpstream, not an exception that cuts the answer off."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise BadUpstream(
            f"the provider's answer could not be translated ({type(exc).__name__})"
        ) from None


class Decoder:
    """An answer's body as its Content-Encoding sent it (gzip or deflate; none passes as is),
    decoded in pieces of at most DECODED_PIECE bytes."""

    def __init__(self, encoding: str) -> None:
        name = encoding.strip().lower()
        self._z: zlib._Decompress | None
        if name in ("", "identity"):
            self._z = None
        elif name in _WBITS:
            self._z = zlib.decompressobj(_WBITS[name])
        else:
            raise BadUpstream(
                f"the provider answered in the content encoding {name[:40]!r}, which the router "
                "does not decode (it asks for identity)",
                "bad encoding",
            )

    @property
    def identity(self) -> bool:
        """The body is as it will be read (its declared length is its length)."""
        return self._z is None

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if self._z is None:
            yield chunk
            return
        try:
            while chunk:
                piece = self._z.decompress(chunk, DECODED_PIECE)
                chunk = self._z.unconsumed_tail
                if piece:
                    yield piece
        except zlib.error:
            raise BadUpstream(
                "the provider's compressed answer is corrupt", "bad encoding"
            ) from None

    def end(self) -> None:
        """The body ended: a compressed one must have been whole."""
        if self._z is not None and not self._z.eof:
            raise BadUpstream("the provider's compressed answer was cut short", "bad encoding")


class Body:
    """A unary answer gathered whole, at most `limit` bytes (its declared length counts before
    any byte is read)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        if declared is not None:
            self._grow(declared)

    def _grow(self, size: int) -> None:
        if size > self._limit:
            raise BadUpstream(
                f"the provider's answer is over the router's bound of {self._limit} bytes "
                "(routing.max_answer_bytes)",
                "answer too large",
            )

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        self._grow(self._size)
        self._parts.append(chunk)

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class StreamCheck:
    """One streamed answer in `wire`'s format, checked as it comes: `feed` hands on whole
    frames only (as they came; an SSE stream's line ends as `\\n`), each at most `limit` bytes
    and well formed (SSE: known fields, JSON objects in `data`; NDJSON: one JSON object a line);
    `end` says whether the wire's terminal frame came. A frame is never held past `limit`."""

    def __init__(self, wire: Dialect, limit: int) -> None:
        self.wire = wire
        self._sse = wire != "ollama"
        self._sep = b"\n\n" if self._sse else b"\n"
        self._limit = limit
        self._held: list[bytes] = []  # the frame under way, in pieces
        self._size = 0
        self._cr = False  # the last chunk ended with "\r" (maybe half of a "\r\n")
        self.ended = False  # the terminal frame came

    def feed(self, chunk: bytes) -> bytes:
        if self._sse:
            if self._cr:
                chunk = b"\r" + chunk
            self._cr = chunk.endswith(b"\r")
            chunk = (chunk[:-1] if self._cr else chunk).replace(b"\r\n", b"\n")
        edge = self._held[-1][-(len(self._sep) - 1) :] if self._held and self._sse else b""
        cut = (edge + chunk).rfind(self._sep)
        if cut < 0:
            self._hold(chunk)
            return b""
        cut += len(self._sep) - len(edge)
        done = b"".join([*self._held, chunk[:cut]])
        self._held, self._size = [], 0
        self._hold(chunk[cut:])
        for frame in done.split(self._sep):
            if frame.strip():
                self._check(frame)
        return done

    def end(self) -> None:
        """The upstream's body ended: raises unless it ended with its terminal frame."""
        if self._held or self._cr:
            raise BadUpstream("the provider's stream ended in the middle of an event", "bad stream")
        if not self.ended:
            raise BadUpstream("the provider's stream ended without its last event", "stream cut")

    def _hold(self, part: bytes) -> None:
        if not part:
            return
        self._size += len(part)
        self._too_large(self._size)
        self._held.append(part)

    def _too_large(self, size: int) -> None:
        if size > self._limit:
            raise BadUpstream(
                f"an event of the provider's stream is over the router's bound of "
                f"{self._limit} bytes (routing.max_event_bytes)",
                "event too large",
            )

    def _check(self, frame: bytes) -> None:
        self._too_large(len(frame))
        if not self._sse:
            self._json(frame.strip())
            return
        data = []
        for line in frame.split(b"\n"):
            if not line:
                continue  # a blank line more between events
            if not line.startswith(_SSE_FIELDS):
                raise BadUpstream("the provider's stream has a line that is not SSE", "bad stream")
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
        if not data:
            return  # a comment, or an event name alone
        payload = b"\n".join(data)
        if self.wire == "openai" and payload.strip() == b"[DONE]":
            self.ended = True
        else:
            self._json(payload)

    def _json(self, payload: bytes) -> None:
        try:
            doc: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise BadUpstream("the provider's stream has an event that is not JSON", "bad stream")
        if doc.get("error") is not None or doc.get("type") == "error":
            self.ended = True  # the upstream's own error event ends it
        elif self.wire == "ollama":
            self.ended = self.ended or doc.get("done") is True
        elif self.wire in _TERMINAL_TYPES:
            self.ended = self.ended or doc.get("type") in _TERMINAL_TYPES[self.wire]
