"""Which translation a request takes, and each dialect's error and stream framing."""

from __future__ import annotations

from typing import Any

import orjson

from serve_app.core.errors import RouterError, sse_error_event
from serve_app.core.schemas import Dialect, Endpoint
from serve_app.dialects import anthropic, ollama
from serve_app.dialects.base import Translation
from serve_app.dialects.responses import ResponsesTranslation

SSE = "text/event-stream"
STREAM_TYPES: dict[Dialect, str] = {
    "openai": SSE,
    "responses": SSE,
    "anthropic": SSE,
    "ollama": ollama.NDJSON,
}


def translation(endpoint: Endpoint, doc: dict[str, Any], stream: bool) -> Translation:
    """A request of another dialect in the internal form (RouterError 400 when it cannot be).

    Validation at the ingress types the fields the router acts on; the rest is read here, so a
    value of the wrong shape deep in a request (a block's text that is a number) is a 400 too.
    """
    try:
        if endpoint.dialect == "ollama":
            return ollama.OllamaTranslation(endpoint, doc, stream)
        if endpoint.dialect == "responses":
            return ResponsesTranslation(doc, stream)
        return anthropic.MessagesTranslation(endpoint, doc, stream)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RouterError(
            400,
            f"malformed {endpoint.dialect} request: {type(exc).__name__}: {str(exc)[:200]}",
            code="invalid_value",
        ) from None


def stream_error(dialect: Dialect, message: str, code: str) -> bytes:
    """The event that ends a stream broken after its first byte, in the client's dialect."""
    if dialect == "ollama":
        return ollama.ndjson(ollama.error_body(message))
    if dialect == "anthropic":
        return anthropic.event("error", anthropic.error_body(500, message))
    if dialect == "responses":
        doc = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"
    return sse_error_event(message, code)


def error_in_dialect(dialect: Dialect, status: int, body: bytes) -> bytes:
    """An error answer in the client's dialect. Bodies in OpenAI's shape (the router's own
    errors, OpenAI-compatible upstreams) are rewritten; others (already the dialect's, as a
    native upstream wrote it, or not JSON) are kept."""
    if dialect in ("openai", "responses"):
        return body
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if dialect == "ollama" and isinstance(err, str):
        return body
    if dialect == "anthropic" and isinstance(doc, dict) and doc.get("type") == "error":
        return body
    if isinstance(err, dict):
        message = str(err.get("message") or "")
    else:
        message = body.decode(errors="replace")[:500] if err is None else str(err)
    if dialect == "ollama":
        return orjson.dumps(ollama.error_body(message))
    return orjson.dumps(anthropic.error_body(status, message))
