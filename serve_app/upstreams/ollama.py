"""Ollama's native API (`/api/chat`, `/api/generate`, `/api/embed`) spoken in OpenAI's format.

Requests are translated to Ollama's shape (options, keep_alive, images, tool calls) and answers,
unary or NDJSON streams, back into OpenAI chat/completion/embedding objects and SSE chunks.
The translation functions are pure; the exchange only holds one request's state.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from serve_app.core.config import ProviderConfig
from serve_app.core.errors import BadUpstream, RouterError, error_body, sse_error_event
from serve_app.core.schemas import Endpoint, RequestMeta
from serve_app.dialects.internal import LineReader
from serve_app.dialects.ollama import OPTIONS
from serve_app.upstreams.base import api_root, json_headers, upstream_model
from serve_app.upstreams.checks import translating

_PATHS = {
    Endpoint.CHAT: "/api/chat",
    Endpoint.COMPLETIONS: "/api/generate",
    Endpoint.EMBEDDINGS: "/api/embed",
}
_DATA_URL_MARK = ";base64,"


def _options(req: dict[str, Any]) -> dict[str, Any]:
    opts = {ollama: req[field] for field, ollama in OPTIONS.items() if req.get(field) is not None}
    stop = req.get("stop")
    if stop is not None:
        opts["stop"] = [stop] if isinstance(stop, str) else stop
    return opts


def _unsupported(message: str, param: str) -> RouterError:
    """A client request an Ollama provider cannot be asked in its API."""
    return RouterError(400, f"ollama providers: {message}", param=param, code="unsupported_content")


def _format(req: dict[str, Any]) -> Any:
    """`response_format` as Ollama's `format`: "json", a JSON schema, or none for text."""
    fmt = req.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return "json"
    spec = fmt.get("json_schema") if kind == "json_schema" else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if isinstance(schema, dict):
        return schema
    raise _unsupported(
        'response_format takes {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {"schema": {...}}}',
        "response_format",
    )


def _message(msg: dict[str, Any]) -> dict[str, Any]:
    role = "system" if msg.get("role") == "developer" else msg.get("role")
    out: dict[str, Any] = {"role": role}
    content = msg.get("content")
    if isinstance(content, list):
        texts, images = [], []
        for part in content:
            if part.get("type") == "text":
                texts.append(part.get("text") or "")
            elif part.get("type") == "image_url":
                images.append(_image(part.get("image_url")))
            else:
                raise _unsupported("message parts are text or image_url", "messages")
        out["content"] = "".join(texts)
        if images:
            out["images"] = images
    else:
        out["content"] = content or ""
    calls = msg.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise _unsupported("tool_calls is a list of function calls", "messages")
        out["tool_calls"] = [_tool_call_to_ollama(c) for c in calls]
    if msg.get("name") and role == "tool":
        out["tool_name"] = msg["name"]
    return out


def _image(image_url: Any) -> str:
    """An image part's base64 data (Ollama takes no URL): from `{"url": "data:...;base64,..."}`."""
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str) or _DATA_URL_MARK not in url:
        raise _unsupported(
            'images are {"url": "data:<type>;base64,<data>"} objects (no remote URLs)', "messages"
        )
    return url.split(_DATA_URL_MARK, 1)[1]


def _tool_call_to_ollama(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        raise _unsupported('a tool call is {"function": {"name", "arguments"}}', "messages")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = orjson.loads(args) if args else {}
        except orjson.JSONDecodeError:
            args = ""  # not JSON: refused below
    if not isinstance(args, dict | None):
        raise RouterError(
            400, "tool call arguments must be a JSON object", param="messages", code="invalid_value"
        )
    return {"function": {"name": fn.get("name"), "arguments": args or {}}}


def _tool_calls_to_openai(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": (c.get("function") or {}).get("name"),
                "arguments": orjson.dumps(
                    (c.get("function") or {}).get("arguments") or {}
                ).decode(),
            },
        }
        for i, c in enumerate(calls)
    ]


def to_ollama_request(
    endpoint: Endpoint, req: dict[str, Any], model: str, stream: bool, keep_alive: str | None
) -> dict[str, Any]:
    """An OpenAI request body as the body of the matching Ollama call."""
    out: dict[str, Any] = {"model": model}
    if endpoint is Endpoint.EMBEDDINGS:
        inp = req["input"]
        if not isinstance(inp, str) and any(not isinstance(x, str) for x in inp):
            raise RouterError(
                400,
                "ollama providers take embedding input as text, not token ids",
                param="input",
                code="unsupported_content",
            )
        out["input"] = inp
    elif endpoint is Endpoint.CHAT:
        out["messages"] = [_message(m) for m in req["messages"]]
        if req.get("tools"):
            out["tools"] = req["tools"]
    else:
        prompt = req["prompt"]
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise RouterError(
                    400,
                    "ollama providers take one text prompt per request",
                    param="prompt",
                    code="unsupported_content",
                )
            prompt = prompt[0]
        out["prompt"] = prompt
        if req.get("suffix"):
            out["suffix"] = req["suffix"]
    if endpoint is not Endpoint.EMBEDDINGS:
        out["stream"] = stream
        opts = _options(req)
        if opts:
            out["options"] = opts
        fmt = _format(req)
        if fmt is not None:
            out["format"] = fmt
    if keep_alive is not None:
        out["keep_alive"] = keep_alive
    return out


def _finish(doc: dict[str, Any], has_tools: bool) -> str:
    if has_tools:
        return "tool_calls"
    return "length" if doc.get("done_reason") == "length" else "stop"


def _usage(doc: dict[str, Any]) -> dict[str, int]:
    prompt = int(doc.get("prompt_eval_count") or 0)
    completion = int(doc.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def from_ollama_response(
    endpoint: Endpoint, doc: dict[str, Any], model: str, response_id: str, created: int
) -> dict[str, Any]:
    """A complete Ollama answer as the OpenAI object for the same endpoint."""
    if endpoint is Endpoint.EMBEDDINGS:
        vectors = doc.get("embeddings") or []
        tokens = int(doc.get("prompt_eval_count") or 0)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    if endpoint is Endpoint.CHAT:
        msg = doc.get("message") or {}
        calls = msg.get("tool_calls") or []
        message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        if calls:
            message["tool_calls"] = _tool_calls_to_openai(calls)
            message["content"] = message["content"] or None
        choice = {"index": 0, "message": message, "finish_reason": _finish(doc, bool(calls))}
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": doc.get("response") or "",
            "logprobs": None,
            "finish_reason": _finish(doc, False),
        }
        obj = "text_completion"
    return {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(doc),
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class StreamTranslator:
    """Ollama NDJSON lines -> OpenAI SSE chunks, for one streamed answer."""

    def __init__(
        self, endpoint: Endpoint, model: str, response_id: str, created: int, include_usage: bool
    ) -> None:
        self.chat = endpoint is Endpoint.CHAT
        self.model = model
        self.id = response_id
        self.created = created
        self.include_usage = include_usage
        self._sent_role = False
        self._tool_calls = False

    def _chunk(self, choice: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        doc: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice else [],
        }
        if usage is not None:
            doc["usage"] = usage
        return _sse(doc)

    def line(self, doc: dict[str, Any]) -> bytes:
        """The SSE bytes for one NDJSON object (possibly several events)."""
        if "error" in doc:
            return sse_error_event(str(doc["error"]))
        out = b""
        if self.chat:
            msg = doc.get("message") or {}
            delta: dict[str, Any] = {}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            if msg.get("content"):
                delta["content"] = msg["content"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = _tool_calls_to_openai(msg["tool_calls"])
                self._tool_calls = True
            if delta:
                out += self._chunk({"index": 0, "delta": delta, "finish_reason": None})
        elif doc.get("response"):
            out += self._chunk(
                {"index": 0, "text": doc["response"], "logprobs": None, "finish_reason": None}
            )
        if doc.get("done"):
            finish = _finish(doc, self._tool_calls)
            empty = (
                {"index": 0, "delta": {}}
                if self.chat
                else {"index": 0, "text": "", "logprobs": None}
            )
            out += self._chunk({**empty, "finish_reason": finish})
            if self.include_usage:
                out += self._chunk({}, _usage(doc))
            out += b"data: [DONE]\n\n"
        return out


def ollama_root(provider: ProviderConfig) -> str:
    """Ollama's native API lives under the host, whatever path `api_host` carries."""
    return api_root(provider.api_host, default_path="").removesuffix("/v1").removesuffix("/api")


class OllamaExchange:
    wire = "ollama"

    def __init__(self, provider: ProviderConfig, meta: RequestMeta, body: bytes) -> None:
        req = orjson.loads(body)
        self.url = ollama_root(provider) + _PATHS[meta.endpoint]
        self.headers = json_headers(provider)
        self.body = orjson.dumps(
            to_ollama_request(
                meta.endpoint,
                req,
                upstream_model(provider, meta.model),
                meta.stream,
                provider.keep_alive,
            )
        )
        self.meta = meta
        prefix = {Endpoint.CHAT: "chatcmpl-", Endpoint.COMPLETIONS: "cmpl-"}.get(meta.endpoint, "")
        self.id = prefix + uuid.uuid4().hex
        self.created = int(time.time())
        options = req.get("stream_options") or {}
        if not isinstance(options, dict):
            raise _unsupported("stream_options is an object", "stream_options")
        self.include_usage = bool(options.get("include_usage"))

    def unary(self, status: int, body: bytes) -> bytes:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if status >= 400:
            msg = doc.get("error") if isinstance(doc, dict) else None
            text = str(msg) if msg else body.decode(errors="replace")[:500]
            kind = "invalid_request_error" if status < 500 else "api_error"
            return error_body(text, kind, "upstream_error")
        if not isinstance(doc, dict):
            raise BadUpstream("ollama answered with a body that is not JSON")
        with translating():
            out = from_ollama_response(
                self.meta.endpoint, doc, self.meta.model, self.id, self.created
            )
        return orjson.dumps(out)

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        tr = StreamTranslator(
            self.meta.endpoint, self.meta.model, self.id, self.created, self.include_usage
        )
        lines = LineReader()
        async for chunk in chunks:
            with translating():
                out = b"".join(tr.line(orjson.loads(line)) for line in lines.feed(chunk))
            if out:
                yield out
        if (last := lines.rest()) is not None:
            with translating():
                out = tr.line(orjson.loads(last))
            yield out


class OllamaNativeExchange:
    """An Ollama client's request to an Ollama provider: passed through, with the provider's
    model name and keep_alive (the client's keep_alive wins); answers name the client's model."""

    wire = "ollama"

    def __init__(self, provider: ProviderConfig, meta: RequestMeta, body: bytes) -> None:
        self.url = f"{ollama_root(provider)}/{meta.endpoint.value}"
        self.headers = json_headers(provider)
        self.model = meta.model
        self.upstream = upstream_model(provider, meta.model)
        if self.upstream != meta.model or provider.keep_alive is not None:
            doc = orjson.loads(body)
            doc["model"] = self.upstream
            if provider.keep_alive is not None:
                doc.setdefault("keep_alive", provider.keep_alive)
            body = orjson.dumps(doc)
        self.body = body

    def _named(self, line: bytes) -> bytes:
        if self.upstream == self.model:
            return line
        doc = orjson.loads(line)
        if isinstance(doc, dict) and "model" in doc:
            doc["model"] = self.model
        return orjson.dumps(doc)

    def unary(self, status: int, body: bytes) -> bytes:
        if status >= 400:
            return body
        try:
            return self._named(body)
        except orjson.JSONDecodeError:
            raise BadUpstream("ollama answered with a body that is not JSON") from None

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if self.upstream == self.model:
            async for chunk in chunks:
                yield chunk
            return
        lines = LineReader()
        async for chunk in chunks:
            out = b"".join(self._named(line) + b"\n" for line in lines.feed(chunk))
            if out:
                yield out
        if (last := lines.rest()) is not None:
            yield self._named(last) + b"\n"
