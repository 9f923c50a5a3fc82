"""Ollama's API spoken by clients (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`),
in the internal form for providers that do not speak it, and their answers back in Ollama's shapes.

The other direction (the router speaking to Ollama providers) is in upstreams/ollama.py; both
use the options table here, so a field maps the same way each way.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from serve_app.core.schemas import Endpoint
from serve_app.dialects.base import now_iso
from serve_app.dialects.internal import Answer, Delta, StreamReader

# OpenAI sampling fields -> Ollama `options` keys.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
    "num_predict": "num_predict",
    "repeat_penalty": "repeat_penalty",
    "num_ctx": "num_ctx",
}
# Ollama `options` keys -> OpenAI fields: the inverse of the provider side's table, for the
# fields every OpenAI-compatible server takes (top_k, num_ctx, ... only Ollama knows).
_STANDARD = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "max_tokens")
_FROM_OPTIONS = {OPTIONS[field]: field for field in _STANDARD} | {"stop": "stop"}
_IMAGE_TYPES = {
    "iVBOR": "image/png",
    "/9j/": "image/jpeg",
    "R0lGOD": "image/gif",
    "UklGR": "image/webp",
}
NDJSON = "application/x-ndjson"


def _data_url(image: str) -> str:
    mime = next((m for head, m in _IMAGE_TYPES.items() if image.startswith(head)), "image/png")
    return f"data:{mime};base64,{image}"


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI's. Ollama's tool answers carry no call id: each takes the id of
    the oldest call not yet answered."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for n, msg in enumerate(messages):
        role = msg.get("role")
        content: Any = msg.get("content") or ""
        if msg.get("images"):
            content = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": _data_url(i)}} for i in msg["images"]
            ]
        item: dict[str, Any] = {"role": role, "content": content}
        if msg.get("tool_calls"):
            calls = []
            for i, call in enumerate(msg["tool_calls"]):
                fn = call.get("function") or {}
                args = fn.get("arguments")
                call_id = f"call_{n}_{i}"
                pending.append(call_id)
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": fn.get("name"),
                            "arguments": args
                            if isinstance(args, str)
                            else orjson.dumps(args or {}).decode(),
                        },
                    }
                )
            item["tool_calls"] = calls
        if role == "tool":
            item["tool_call_id"] = pending.pop(0) if pending else f"call_{n}"
            if msg.get("tool_name"):
                item["name"] = msg["tool_name"]
        out.append(item)
    return out


def _sampling(doc: dict[str, Any]) -> dict[str, Any]:
    opts = doc.get("options") or {}
    out = {openai: opts[key] for key, openai in _FROM_OPTIONS.items() if opts.get(key) is not None}
    fmt = doc.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "format", "schema": fmt},
        }
    return out


def to_internal(
    endpoint: Endpoint, doc: dict[str, Any], stream: bool
) -> tuple[Endpoint, dict[str, Any]]:
    """An Ollama request as the internal request (`keep_alive` and `think` only Ollama knows)."""
    model = doc["model"]
    if endpoint in (Endpoint.OLLAMA_EMBED, Endpoint.OLLAMA_EMBEDDINGS):
        text = doc.get("input") if endpoint is Endpoint.OLLAMA_EMBED else doc.get("prompt")
        body: dict[str, Any] = {"model": model, "input": text or ""}
        if doc.get("dimensions") is not None:
            body["dimensions"] = doc["dimensions"]
        return Endpoint.EMBEDDINGS, body
    if endpoint is Endpoint.OLLAMA_CHAT:
        internal = Endpoint.CHAT
        body = {"model": model, "messages": _messages(doc.get("messages") or [])}
        if doc.get("tools"):
            body["tools"] = doc["tools"]
    elif doc.get("system") or doc.get("images"):  # generate with what only chat carries
        internal = Endpoint.CHAT
        user = {"role": "user", "content": doc.get("prompt") or "", "images": doc.get("images")}
        system = [{"role": "system", "content": doc["system"]}] if doc.get("system") else []
        body = {"model": model, "messages": _messages([*system, user])}
    else:
        internal = Endpoint.COMPLETIONS
        body = {"model": model, "prompt": doc.get("prompt") or ""}
        if doc.get("suffix"):
            body["suffix"] = doc["suffix"]
    body |= _sampling(doc)
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}  # for the final counts
    return internal, body


def _tool_calls(answer: Answer) -> list[dict[str, Any]]:
    """Ollama's calls: each with the upstream's id (left out when it gave none, as Ollama writes
    an empty one) and `function.index`, its place in the message, which Ollama always writes."""
    return [
        ({"id": c.id} if c.id else {})
        | {"function": {"index": i, "name": c.name, "arguments": c.parsed()}}
        for i, c in enumerate(answer.tool_calls)
    ]


def _metrics(**values: int) -> dict[str, int]:
    """Ollama's Metrics fields are `omitempty`: a zero is left out, as Ollama leaves it out."""
    return {name: value for name, value in values.items() if value}


def _done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


class OllamaTranslation:
    def __init__(self, endpoint: Endpoint, doc: dict[str, Any], stream: bool) -> None:
        self.dialect_endpoint = endpoint
        self.model = doc["model"]
        self.endpoint, self.body = to_internal(endpoint, doc, stream)
        self.started = time.monotonic_ns()  # the request to this provider is being sent

    def _elapsed_ns(self) -> int:
        return time.monotonic_ns() - self.started

    def _counts(self, answer: Answer, first_ns: int | None = None) -> dict[str, int]:
        """The done line's metrics, in nanoseconds of the router's clock since the request went
        to the provider. A stream's first chunk (`first_ns`) ends the prompt's evaluation, the
        rest is generation. A unary answer arrives whole, so the router cannot tell the two
        apart: its time is shared between them by their token counts. The router loads no
        model, so there is no `load_duration`."""
        total = self._elapsed_ns()
        usage = answer.usage
        if first_ns is not None:
            prompt_ns = first_ns - self.started
        else:
            tokens = usage.prompt + usage.completion
            prompt_ns = total * usage.prompt // tokens if tokens else 0
        return _metrics(
            total_duration=total,
            prompt_eval_count=usage.prompt,
            prompt_eval_duration=prompt_ns,
            eval_count=usage.completion,
            eval_duration=total - prompt_ns,
        )

    def _head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": now_iso()}

    def unary(self, answer: Answer, doc: dict[str, Any]) -> dict[str, Any]:
        if self.dialect_endpoint is Endpoint.OLLAMA_EMBEDDINGS:
            data = doc.get("data") or [{}]
            return {"embedding": data[0].get("embedding") or []}
        if self.dialect_endpoint is Endpoint.OLLAMA_EMBED:  # EmbedResponse: no eval fields
            return {
                "model": self.model,
                "embeddings": [d.get("embedding") for d in doc.get("data") or []],
                **_metrics(
                    total_duration=self._elapsed_ns(),
                    prompt_eval_count=answer.usage.prompt,
                ),
            }
        out = self._head() | self._content(answer.text, answer.reasoning)
        if answer.tool_calls and self.dialect_endpoint is Endpoint.OLLAMA_CHAT:
            out["message"]["tool_calls"] = _tool_calls(answer)
        return (
            out | {"done": True, "done_reason": _done_reason(answer.finish)} | self._counts(answer)
        )

    def _content(self, text: str, reasoning: str) -> dict[str, Any]:
        if self.dialect_endpoint is Endpoint.OLLAMA_CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if reasoning:
                message["thinking"] = reasoning
            return {"message": message}
        return {"response": text} | ({"thinking": reasoning} if reasoning else {})

    def writer(self) -> OllamaStream:
        return OllamaStream(self)


def ndjson(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc) + b"\n"


class OllamaStream:
    """NDJSON lines: one per content piece, then the `done` line with the counts."""

    def __init__(self, translation: OllamaTranslation) -> None:
        self.t = translation
        self.reader = StreamReader()
        self.first_ns: int | None = None  # when the first chunk came: the prompt was evaluated

    def start(self) -> bytes:
        return b""

    def deltas(self, deltas: list[Delta]) -> bytes:
        if self.first_ns is None:
            self.first_ns = time.monotonic_ns()
        return b"".join(
            ndjson(self.t._head() | self.t._content(d.text, d.reasoning) | {"done": False})
            for d in deltas
            if d.tool_index is None
        )

    def end(self) -> bytes:
        answer = self.reader.answer
        out = b""
        if answer.tool_calls and self.t.dialect_endpoint is Endpoint.OLLAMA_CHAT:
            line = self.t._head() | self.t._content("", "")
            line["message"]["tool_calls"] = _tool_calls(answer)
            out += ndjson(line | {"done": False})
        last = self.t._head() | self.t._content("", "")
        return out + ndjson(
            last
            | {"done": True, "done_reason": _done_reason(answer.finish)}
            | self.t._counts(answer, self.first_ns)
        )

    def error(self, message: str, code: str) -> bytes:
        return ndjson({"error": message})


def error_body(message: str) -> dict[str, Any]:
    return {"error": message}


# The Ollama API level these answers follow (clients such as Open WebUI read it).
API_VERSION = "0.12.0"
_EPOCH = "1970-01-01T00:00:00Z"


# Ollama's expiry for a model kept loaded forever (keep_alive -1): now plus the longest Go
# time.Duration; `ollama ps` shows it as "Forever".
_FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)


def _model(name: str, family: str, parent: str | None) -> dict[str, Any]:
    """What `/api/tags` and `/api/ps` entries share (the router has no file sizes or digests of
    its own: they are zero and a hash of the name)."""
    return {
        "name": name,
        "model": name,
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": parent or "",
            "format": "",
            "family": family,
            "families": [family],
            "parameter_size": "",
            "quantization_level": "",
        },
    }


def model_entry(name: str, family: str, parent: str | None) -> dict[str, Any]:
    """One model as `/api/tags` lists it."""
    return _model(name, family, parent) | {"modified_at": _EPOCH}


def running_entry(name: str, family: str, parent: str | None) -> dict[str, Any]:
    """One model as `/api/ps` lists it (a loaded model: no `modified_at`). The router's models
    stay served, so they never expire; it holds no memory of its own (`size_vram` 0) and its
    providers' contexts may differ (`context_length` 0, as Ollama writes a model still
    loading)."""
    return _model(name, family, parent) | {
        "expires_at": (datetime.now(timezone.utc) + _FOREVER).isoformat(),
        "size_vram": 0,
        "context_length": 0,
    }


def show_answer(name: str, family: str, parent: str | None, tools: bool) -> dict[str, Any]:
    """`/api/show` for a model the router serves."""
    entry = model_entry(name, family, parent)
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": entry["details"],
        "model_info": {"general.architecture": family},
        "capabilities": ["completion", "tools"] if tools else ["completion"],
        "modified_at": _EPOCH,
    }
