"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) for providers without
it: the request as a chat completion, the answer and its stream in Anthropic's shapes."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint
from serve_app.dialects.internal import Answer, Delta, StreamReader

_STOP = {"length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use"}
# HTTP status -> Anthropic's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def _text(blocks: Any) -> str:
    if isinstance(blocks, str):
        return blocks
    return "".join(b.get("text") or "" for b in blocks or [] if b.get("type") == "text")


def _unsupported(kind: object) -> RouterError:
    return RouterError(
        400,
        f"content blocks of type {kind!r} are not supported by this model's providers",
        param="messages",
        code="unsupported_content",
    )


def _user(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A user turn's blocks: tool results become tool messages (first, as OpenAI orders them),
    the rest one user message."""
    tools, parts = [], []
    for block in blocks:
        kind = block.get("type")
        if kind == "tool_result":
            text = _text(block.get("content"))
            if block.get("is_error"):
                text = f"error: {text}"
            tools.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
            )
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "image":
            source = block.get("source") or {}
            if source.get("type") == "base64":
                url = f"data:{source.get('media_type')};base64,{source.get('data')}"
            elif source.get("type") == "url":
                url = source.get("url") or ""
            else:
                raise _unsupported(f"image source {source.get('type')}")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise _unsupported(kind)
    return tools + ([{"role": "user", "content": parts}] if parts else [])


def _assistant(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    calls = [
        {
            "id": b.get("id"),
            "type": "function",
            "function": {
                "name": b.get("name"),
                "arguments": orjson.dumps(b.get("input") or {}).decode(),
            },
        }
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    for b in blocks:
        if b.get("type") not in ("text", "tool_use", "thinking", "redacted_thinking"):
            raise _unsupported(b.get("type"))
    msg: dict[str, Any] = {"role": "assistant", "content": _text(blocks) or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = _text(doc.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for msg in doc["messages"]:
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
        elif msg["role"] == "assistant":
            out.append(_assistant(content))
        else:
            out.extend(_user(content))
    return out


def _tool_choice(choice: dict[str, Any]) -> Any:
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"any": "required", "none": "none"}.get(kind or "", "auto")


def to_internal(endpoint: Endpoint, doc: dict[str, Any], stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": doc["model"], "messages": _messages(doc)}
    if doc.get("tools"):
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description") or "",
                    "parameters": t.get("input_schema") or {"type": "object"},
                },
            }
            for t in doc["tools"]
        ]
    if endpoint is Endpoint.COUNT_TOKENS:
        # The provider's own tokenizer counts: one generated token, the prompt's usage read back.
        return body | {"max_tokens": 1, "stream": False}
    if doc.get("tool_choice"):
        body["tool_choice"] = _tool_choice(doc["tool_choice"])
        if doc["tool_choice"].get("disable_parallel_tool_use"):
            body["parallel_tool_calls"] = False
    body["max_tokens"] = doc["max_tokens"]
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("stop_sequences", "stop"),
    ):
        if doc.get(ours) is not None:
            body[theirs] = doc[ours]
    user = (doc.get("metadata") or {}).get("user_id")
    if user:
        body["user"] = user
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _stop_reason(answer: Answer, stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence (OpenAI does not say which sequence stopped it:
    the one the text ends before is not in the text, so only a single one can be named)."""
    if answer.finish == "stop" and len(stops) == 1:
        return "stop_sequence", stops[0]
    return _STOP.get(answer.finish or "", "end_turn"), None


def _tool_use(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


class MessagesTranslation:
    endpoint = Endpoint.CHAT

    def __init__(self, endpoint: Endpoint, doc: dict[str, Any], stream: bool) -> None:
        self.dialect_endpoint = endpoint
        self.model = doc["model"]
        self.body = to_internal(endpoint, doc, stream)
        self.id = f"msg_{uuid.uuid4().hex}"
        # Only a single stop sequence can be named: a stop that ends a text early says none.
        self.stops = [] if doc.get("stop_sequences") is None else list(doc["stop_sequences"])

    def message(self, content: list[dict[str, Any]], answer: Answer | None) -> dict[str, Any]:
        reason, sequence = (None, None) if answer is None else _stop_reason(answer, self.stops)
        usage = {"input_tokens": 0 if answer is None else answer.usage.prompt}
        usage["output_tokens"] = 0 if answer is None else answer.usage.completion
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage,
        }

    def unary(self, answer: Answer, doc: dict[str, Any]) -> dict[str, Any]:
        if self.dialect_endpoint is Endpoint.COUNT_TOKENS:
            return {"input_tokens": answer.usage.prompt}
        content: list[dict[str, Any]] = []
        if answer.reasoning:
            content.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
        if answer.text:
            content.append({"type": "text", "text": answer.text})
        content += [_tool_use(c.id, c.name, c.parsed()) for c in answer.tool_calls]
        return self.message(content, answer)

    def writer(self) -> MessagesStream:
        return MessagesStream(self)


def event(kind: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind} | doc) + b"\n\n"


class MessagesStream:
    """message_start, a content block per text run or tool call (start, deltas, stop),
    message_delta with the stop reason and usage, message_stop."""

    def __init__(self, translation: MessagesTranslation) -> None:
        self.t = translation
        self.reader = StreamReader()
        self._block = -1
        self._open: str | int | None = None  # "text", "thinking", or a tool call's index

    def start(self) -> bytes:
        return event("message_start", {"message": self.t.message([], None)})

    def _switch(self, to: str | int, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._block += 1
        self._open = to
        return out + event("content_block_start", {"index": self._block, "content_block": block})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return event("content_block_stop", {"index": self._block})

    def deltas(self, deltas: list[Delta]) -> bytes:
        out = b""
        for d in deltas:
            if d.reasoning:
                if self._open != "thinking":
                    out += self._switch(
                        "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                    )
                delta = {"type": "thinking_delta", "thinking": d.reasoning}
                out += event("content_block_delta", {"index": self._block, "delta": delta})
            if d.text:
                if self._open != "text":
                    out += self._switch("text", {"type": "text", "text": ""})
                delta = {"type": "text_delta", "text": d.text}
                out += event("content_block_delta", {"index": self._block, "delta": delta})
            if d.tool_index is not None:
                if self._open != d.tool_index:
                    out += self._switch(d.tool_index, _tool_use(d.tool_id, d.tool_name, {}))
                if d.tool_arguments:
                    delta = {"type": "input_json_delta", "partial_json": d.tool_arguments}
                    out += event("content_block_delta", {"index": self._block, "delta": delta})
        return out

    def end(self) -> bytes:
        answer = self.reader.answer
        reason, sequence = _stop_reason(answer, self.t.stops)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        usage = {"input_tokens": answer.usage.prompt, "output_tokens": answer.usage.completion}
        return (
            self._close()
            + event("message_delta", {"delta": delta, "usage": usage})
            + event("message_stop", {})
        )

    def error(self, message: str, code: str) -> bytes:
        return event("error", {"error": {"type": "api_error", "message": message}})


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}
