"""Reading the internal form's answers: OpenAI chat/completion objects and their SSE streams.

Each dialect writes its answers from what is gathered here, so text, reasoning, tool calls,
finish reasons and usage are read from OpenAI's shapes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

DONE = b"[DONE]"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI carries it

    def parsed(self) -> Any:
        """The arguments as JSON (a model may write broken JSON: then the text itself)."""
        try:
            return orjson.loads(self.arguments) if self.arguments else {}
        except orjson.JSONDecodeError:
            return self.arguments


@dataclass
class Usage:
    prompt: int = 0
    completion: int = 0

    @classmethod
    def of(cls, doc: dict[str, Any] | None) -> Usage:
        doc = doc or {}
        return cls(int(doc.get("prompt_tokens") or 0), int(doc.get("completion_tokens") or 0))


@dataclass
class Answer:
    """One complete chat or completion answer (the first choice)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish: str | None = None
    usage: Usage = field(default_factory=Usage)


def _reasoning(part: dict[str, Any]) -> str:
    """vLLM's reasoning parsers write `reasoning_content` (newer releases: `reasoning`)."""
    return part.get("reasoning_content") or part.get("reasoning") or ""


def read_answer(doc: dict[str, Any]) -> Answer:
    """A unary chat.completion or text_completion object."""
    choices = doc.get("choices") or [{}]
    choice = choices[0]
    msg = choice.get("message") or {}
    calls = [
        ToolCall(
            c.get("id") or f"call_{i}",
            (c.get("function") or {}).get("name") or "",
            (c.get("function") or {}).get("arguments") or "",
        )
        for i, c in enumerate(msg.get("tool_calls") or [])
    ]
    text = msg.get("content") if msg else choice.get("text")
    return Answer(
        text=text or "",
        reasoning=_reasoning(msg),
        tool_calls=calls,
        finish=choice.get("finish_reason"),
        usage=Usage.of(doc.get("usage")),
    )


@dataclass
class Delta:
    """What one stream chunk adds. `tool_index`/`tool_*`: a fragment of one tool call."""

    text: str = ""
    reasoning: str = ""
    tool_index: int | None = None
    tool_id: str = ""
    tool_name: str = ""
    tool_arguments: str = ""


class StreamReader:
    """Folds OpenAI stream chunks into an Answer while handing each chunk's news to the caller."""

    def __init__(self) -> None:
        self.answer = Answer()
        self._calls: dict[int, ToolCall] = {}

    def read(self, doc: dict[str, Any]) -> list[Delta]:
        if doc.get("usage"):
            self.answer.usage = Usage.of(doc["usage"])
        out: list[Delta] = []
        for choice in doc.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta is None:  # a text_completion chunk
                delta = {"content": choice.get("text")}
            if delta.get("content") or _reasoning(delta):
                out.append(Delta(text=delta.get("content") or "", reasoning=_reasoning(delta)))
                self.answer.text += delta.get("content") or ""
                self.answer.reasoning += _reasoning(delta)
            for i, frag in enumerate(delta.get("tool_calls") or []):
                index = int(frag.get("index", i))
                fn = frag.get("function") or {}
                call = self._calls.get(index)
                if call is None:
                    call = ToolCall(frag.get("id") or f"call_{index}", fn.get("name") or "", "")
                    self._calls[index] = call
                    self.answer.tool_calls.append(call)
                call.arguments += fn.get("arguments") or ""
                out.append(
                    Delta(
                        tool_index=index,
                        tool_id=call.id,
                        tool_name=call.name,
                        tool_arguments=fn.get("arguments") or "",
                    )
                )
            if choice.get("finish_reason"):
                self.answer.finish = choice["finish_reason"]
        return out


class SSEReader:
    """Splits an SSE byte stream, cut anywhere, into its `data:` payloads."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk.replace(b"\r\n", b"\n")
        *events, self._buf = self._buf.split(b"\n\n")
        return [
            line[5:].strip()
            for event in events
            for line in event.split(b"\n")
            if line.startswith(b"data:")
        ]


class LineReader:
    """Splits an NDJSON byte stream (Ollama's), cut anywhere, into its lines."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines this chunk completes (blank ones left out)."""
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        return [line for line in lines if line.strip()]

    def rest(self) -> bytes | None:
        """A last line the stream ended without a newline after, if any."""
        return self._buf if self._buf.strip() else None


def error_message(doc: dict[str, Any]) -> str | None:
    """The message of an OpenAI error object (`{"error": {...}}` or `{"error": "..."}`)."""
    err = doc.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)
