"""OpenAI's Responses API (`/v1/responses`) for providers without it: the request as a chat
completion, the answer and its stream as a Response object and Responses events."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint
from serve_app.dialects.base import now_s
from serve_app.dialects.internal import Answer, Delta, StreamReader

# Request fields copied into the Response object as the API echoes them.
_ECHOED = (
    "instructions",
    "max_output_tokens",
    "metadata",
    "temperature",
    "top_p",
    "tool_choice",
    "previous_response_id",
)


def echo_of(doc: dict[str, Any]) -> dict[str, Any]:
    """What a Response object repeats of its request."""
    return {k: doc.get(k) for k in _ECHOED} | {
        "model": doc["model"],
        "tools": doc.get("tools") or [],
        "parallel_tool_calls": doc.get("parallel_tool_calls", True),
        "text": doc.get("text") or {"format": {"type": "text"}},
        "tool_choice": doc.get("tool_choice") or "auto",
        "store": doc.get("store") is not False,
        "background": doc.get("background") is True,
    }


def response_object(
    response_id: str, created: int, echo: dict[str, Any], status: str, **fields: Any
) -> dict[str, Any]:
    """A Response object (`fields`: output, usage, error, incomplete_details when known)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
        **fields,
        **echo,
    }


def _content(content: Any) -> Any:
    """Input content parts as chat content parts (a string stays a string)."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url") or ""}})
        else:
            raise RouterError(
                400,
                f"input content of type {kind!r} is not supported by this model's providers",
                param="input",
                code="unsupported_content",
            )
    return parts


def _messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if doc.get("instructions"):
        out.append({"role": "system", "content": doc["instructions"]})
    items = doc["input"]
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": _content(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
            }
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "reasoning":
            continue  # a reasoning model's thoughts from an earlier turn: not for chat models
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else orjson.dumps(output).decode()
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        else:
            raise RouterError(
                400,
                f"input items of type {kind!r} are not supported by this model's providers",
                param="input",
                code="unsupported_content",
            )
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        if tool.get("type") != "function":
            raise RouterError(
                400,
                f"tools of type {tool.get('type')!r} are not supported by this model's providers",
                param="tools",
                code="unsupported_tool",
            )
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def to_internal(doc: dict[str, Any], stream: bool) -> dict[str, Any]:
    """The request as a chat completion (a continuation comes here with its earlier turns
    already in `input`: conversations/)."""
    body: dict[str, Any] = {"model": doc["model"], "messages": _messages(doc), "stream": stream}
    if doc.get("tools"):
        body["tools"] = _tools(doc["tools"])
    if doc.get("tool_choice") is not None:
        body["tool_choice"] = _tool_choice(doc["tool_choice"])
    if doc.get("max_output_tokens") is not None:
        body["max_tokens"] = doc["max_output_tokens"]
    for key in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if doc.get(key) is not None:
            body[key] = doc[key]
    fmt = (doc.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt.get("type") not in (None, "text"):
        raise RouterError(
            400,
            "text.format.type is text, json_object or json_schema",
            param="text.format",
            code="invalid_value",
        )
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if text else [],
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class ResponsesTranslation:
    endpoint = Endpoint.CHAT

    def __init__(self, doc: dict[str, Any], stream: bool) -> None:
        self.body = to_internal(doc, stream)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = now_s()
        self.echo = echo_of(doc)

    def response(
        self, status: str, output: list[dict[str, Any]], answer: Answer | None
    ) -> dict[str, Any]:
        incomplete = answer is not None and answer.finish == "length"
        usage = None
        if answer is not None:
            usage = {
                "input_tokens": answer.usage.prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": answer.usage.completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": answer.usage.prompt + answer.usage.completion,
            }
        return response_object(
            self.id,
            self.created,
            self.echo,
            "incomplete" if incomplete and status == "completed" else status,
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            output=output,
            usage=usage,
        )

    def output(self, answer: Answer) -> list[dict[str, Any]]:
        items = []
        if answer.text or not answer.tool_calls:
            items.append(_message_item(self.message_id, answer.text, "completed"))
        items += [
            _call_item(f"fc_{c.id}", c.id, c.name, c.arguments, "completed")
            for c in answer.tool_calls
        ]
        return items

    def unary(self, answer: Answer, doc: dict[str, Any]) -> dict[str, Any]:
        return self.response("completed", self.output(answer), answer)

    def writer(self) -> ResponsesStream:
        return ResponsesStream(self)


def event(kind: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind} | doc) + b"\n\n"


# The event that ends a stream, by the response's final status.
_FINAL_EVENTS = {"incomplete": "response.incomplete", "failed": "response.failed"}


def replay(response: dict[str, Any]) -> bytes:
    """A finished response as a stream's events (`GET /v1/responses/{id}?stream=true`): created,
    each output item added and done, then the final event with the whole response."""
    events = [
        (
            "response.created",
            {"response": {**response, "status": "in_progress"} | {"output": [], "usage": None}},
        )
    ]
    for index, item in enumerate(response.get("output") or []):
        events.append(("response.output_item.added", {"output_index": index, "item": item}))
        events.append(("response.output_item.done", {"output_index": index, "item": item}))
    status = str(response.get("status"))
    events.append((_FINAL_EVENTS.get(status, "response.completed"), {"response": response}))
    return b"".join(
        event(kind, {"sequence_number": n} | doc) for n, (kind, doc) in enumerate(events)
    )


class ResponsesStream:
    """response.created, then per output item: added, deltas, done; then response.completed."""

    def __init__(self, translation: ResponsesTranslation) -> None:
        self.t = translation
        self.reader = StreamReader()
        self._seq = 0
        self._text_open = False
        self._items: list[str] = []  # output item ids in order: the message, then calls
        self._calls: dict[int, int] = {}  # tool index -> output index

    def _event(self, kind: str, doc: dict[str, Any]) -> bytes:
        out = event(kind, {"sequence_number": self._seq} | doc)
        self._seq += 1
        return out

    def start(self) -> bytes:
        created = self.t.response("in_progress", [], None)
        return self._event("response.created", {"response": created}) + self._event(
            "response.in_progress", {"response": created}
        )

    def _open_text(self) -> bytes:
        self._text_open = True
        self._items.append(self.t.message_id)
        index = len(self._items) - 1
        item = _message_item(self.t.message_id, "", "in_progress")
        part = {"type": "output_text", "text": "", "annotations": []}
        return self._event("response.output_item.added", {"output_index": index, "item": item}) + (
            self._event(
                "response.content_part.added",
                {
                    "item_id": self.t.message_id,
                    "output_index": index,
                    "content_index": 0,
                    "part": part,
                },
            )
        )

    def deltas(self, deltas: list[Delta]) -> bytes:
        out = b""
        for d in deltas:
            if d.tool_index is None:
                if not d.text:
                    continue
                if not self._text_open:
                    out += self._open_text()
                out += self._event(
                    "response.output_text.delta",
                    {
                        "item_id": self.t.message_id,
                        "output_index": self._items.index(self.t.message_id),
                        "content_index": 0,
                        "delta": d.text,
                    },
                )
                continue
            if d.tool_index not in self._calls:
                self._items.append(f"fc_{d.tool_id}")
                self._calls[d.tool_index] = len(self._items) - 1
                item = _call_item(f"fc_{d.tool_id}", d.tool_id, d.tool_name, "", "in_progress")
                out += self._event(
                    "response.output_item.added",
                    {"output_index": len(self._items) - 1, "item": item},
                )
            if d.tool_arguments:
                index = self._calls[d.tool_index]
                out += self._event(
                    "response.function_call_arguments.delta",
                    {
                        "item_id": self._items[index],
                        "output_index": index,
                        "delta": d.tool_arguments,
                    },
                )
        return out

    def end(self) -> bytes:
        answer = self.reader.answer
        out = b""
        if self._text_open:
            index = self._items.index(self.t.message_id)
            part = {"type": "output_text", "text": answer.text, "annotations": []}
            where = {"item_id": self.t.message_id, "output_index": index, "content_index": 0}
            out += self._event("response.output_text.done", where | {"text": answer.text})
            out += self._event("response.content_part.done", where | {"part": part})
            item = _message_item(self.t.message_id, answer.text, "completed")
            out += self._event("response.output_item.done", {"output_index": index, "item": item})
        for tool_index, index in self._calls.items():
            call = answer.tool_calls[list(self._calls).index(tool_index)]
            out += self._event(
                "response.function_call_arguments.done",
                {"item_id": self._items[index], "output_index": index, "arguments": call.arguments},
            )
            item = _call_item(self._items[index], call.id, call.name, call.arguments, "completed")
            out += self._event("response.output_item.done", {"output_index": index, "item": item})
        final = self.t.response("completed", self.t.output(answer), answer)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, {"response": final})

    def error(self, message: str, code: str) -> bytes:
        return self._event("error", {"code": code, "message": message, "param": None})
