"""What the router keeps of an OpenAI Response, and how a continuation is expanded.

A stored response holds its whole conversation: the input items of every earlier turn, their
output items, then its own input. A continuation (`previous_response_id`) therefore reads one
record, and an active conversation never depends on an older record that has been evicted.
As in OpenAI's API, the `instructions` of an earlier turn are not carried into the next.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel

Status = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
RUNNING: frozenset[str] = frozenset({"queued", "in_progress"})
# The Responses SSE events that end a stream and carry the final response object.
TERMINAL_EVENTS = (b"response.completed", b"response.incomplete", b"response.failed")


class StoredResponse(BaseModel):
    """One response as the store keeps it (the `response` object as the client got it)."""

    id: str
    owner: str  # the client key's id ("" when keys are off)
    model: str
    created: float  # wall clock, seconds
    input: list[dict[str, Any]]  # the whole conversation's input for this turn
    response: dict[str, Any]
    turns: int = 1  # how many responses the conversation has, this one included
    keeper: str = ""  # the provider that keeps its own copy (a vLLM with its store), if any
    upstream_id: str = ""  # the response's id at the keeper
    background: bool = False
    expires: float | None = None  # a running background response is lost after this

    @property
    def status(self) -> str:
        return str(self.response.get("status") or "completed")

    def size(self) -> int:
        return len(self.model_dump_json())


def own_input(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A request's `input` as items (a string is one user message)."""
    items = doc.get("input")
    if isinstance(items, str):
        return [{"type": "message", "role": "user", "content": items}]
    return list(items or [])


def conversation(previous: StoredResponse | None, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The input items of a turn: the earlier turns' inputs and outputs, then its own."""
    if previous is None:
        return own_input(doc)
    return [*previous.input, *(previous.response.get("output") or []), *own_input(doc)]


def expanded(doc: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The request as a provider without the earlier turns needs it: the whole conversation in
    `input`, no `previous_response_id`."""
    out = {k: v for k, v in doc.items() if k != "previous_response_id"}
    out["input"] = items
    return out


def listed_items(record: StoredResponse) -> list[dict[str, Any]]:
    """`/input_items` entries: every input item with an id (one is made for those sent
    without, stable for the record)."""
    return [
        {"id": f"item_{record.id.removeprefix('resp_')}_{n}", **item} if "id" not in item else item
        for n, item in enumerate(record.input)
    ]


def page(items: list[dict[str, Any]], order: str, after: str | None, limit: int) -> dict[str, Any]:
    """One page of a list in OpenAI's cursor shape."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item.get("id") for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


class TerminalTap:
    """Finds the final response object in a Responses SSE stream as it passes: only events
    whose name says they end the stream are parsed (a token's event costs one search)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.response: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bool:
        """True when `chunk` completes the terminal event (`response` is then set)."""
        if self.response is not None:
            return False
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(b"\n\n")
        if end < 0:  # the middle of an event: kept until its end comes
            self._buffer = data
            return False
        self._buffer, complete = data[end + 2 :], data[:end]
        if not any(name in complete for name in TERMINAL_EVENTS):
            return False
        for event in complete.split(b"\n\n"):
            event = event.lstrip()
            if event.startswith(b"event: ") and event[7:].startswith(TERMINAL_EVENTS):
                self.response = _event_response(event)
        return self.response is not None


def _event_response(event: bytes) -> dict[str, Any] | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                doc = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return None
            response = doc.get("response") if isinstance(doc, dict) else None
            return response if isinstance(response, dict) else None
    return None
