"""What every dialect's translation provides: the internal request, and the way back."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Protocol

from serve_app.core.schemas import Endpoint
from serve_app.dialects.internal import Answer, Delta, StreamReader


class StreamWriter(Protocol):
    """Writes a dialect's stream from the internal stream's chunks."""

    reader: StreamReader

    def start(self) -> bytes:
        """What the dialect sends before any content."""

    def deltas(self, deltas: list[Delta]) -> bytes:
        """The dialect's bytes for one chunk's news."""

    def end(self) -> bytes:
        """The closing events, from what the reader gathered (finish reason, usage)."""

    def error(self, message: str, code: str) -> bytes:
        """The event that ends a stream broken after its first byte."""


class Translation(Protocol):
    """One client request put in the internal form, and how its answer goes back."""

    endpoint: Endpoint  # the internal endpoint
    body: dict[str, Any]

    def unary(self, answer: Answer, doc: dict[str, Any]) -> dict[str, Any]:
        """The dialect's answer from the internal one (read, and raw)."""

    def writer(self) -> StreamWriter: ...


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def now_s() -> int:
    return int(time.time())
