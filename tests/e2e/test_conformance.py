"""The demo upstream held to a real vLLM: the same wire assertions (status codes, body shapes)
against both. A difference found here is fixed in `serve_app/demo/upstream.py`. Run by `make e2e`.

The demo's text, ids and counts are its own, so answers are compared by shape, order and
arithmetic, never by text. Key sets are compared with vLLM's recorded answers (tests/wire/vllm_*,
`python -m tests.e2e.record_wire`): the demo builds its Responses and Messages answers from
those recordings, and a vLLM that answers differently from them needs a new recording.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import free_port
from tests.e2e.record_wire import TOOL_CHAT, TOOL_SERVER, WEATHER, folder
from tests.e2e.vllm_server import MODEL_DIR, SERVED_MODEL, VllmServer

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "hello there"}]
# Greedy and short: vLLM's tiny model stops at the token limit ("incomplete", "max_tokens"),
# the demo ends its text itself ("completed", "end_turn"); both are accepted, consistently.
RESPONSES = {"input": "hello there", "max_output_tokens": 4, "temperature": 0}
MESSAGES = {"messages": HELLO, "max_tokens": 4, "temperature": 0}
Event = tuple[str, dict[str, Any]]
INCLUDE_USAGE = {"include_usage": True}


@pytest.fixture(scope="module")
def demo() -> Iterator[FakeUpstream]:
    up = FakeUpstream(SERVED_MODEL, served=frozenset({SERVED_MODEL}))
    up.start_in_thread()
    yield up
    up.stop_thread()


@pytest.fixture(params=["demo", "vllm"])
def upstream(request: pytest.FixtureRequest, demo: FakeUpstream) -> str:
    if request.param == "demo":
        return demo.url
    servers: list[VllmServer] = request.getfixturevalue("vllm")
    return servers[0].url


def call(url: str, body: dict | None = None) -> tuple[int, str, bytes]:
    """Status, content type and body; a GET without a body."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers.get("content-type") or "", resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type") or "", err.read()


def error_of(status: int, ctype: str, body: bytes) -> dict:
    """The OpenAI error object of a JSON error answer."""
    assert ctype.startswith("application/json"), (status, ctype, body)
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == status
    return error


def chat(model: str, **extra: object) -> dict:
    return {"model": model, "messages": HELLO, "max_tokens": 4, **extra}


# ---- a tool call forced by a named tool_choice (first in the file: see tool_upstream) ----------
@pytest.fixture(params=["demo", "vllm"])
def tool_upstream(request: pytest.FixtureRequest, demo: FakeUpstream) -> Iterator[str]:
    """vLLM answers a named tool_choice only with a tool parser loaded (without, a 400 that
    names --tool-call-parser: tests/wire/vllm_chat_tool_named_refused.json), so the real one
    here is a server of its own with the recorder's arguments, for this test only. Started
    while no other is, when this module runs first (its tests run in file order)."""
    if request.param == "demo":
        yield demo.url
        return
    server = VllmServer("conformance-tools", free_port(), core=0, extra=TOOL_SERVER)
    server.start()
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


def check_call(call_: dict) -> None:
    """A call of the named function whose arguments are JSON its schema allows."""
    assert call_["type"] == "function" and isinstance(call_["id"], str) and call_["id"]
    assert call_["function"]["name"] == WEATHER["function"]["name"]
    arguments = json.loads(call_["function"]["arguments"])
    schema = WEATHER["function"]["parameters"]
    assert isinstance(arguments, dict) and set(arguments) == set(schema["required"])
    assert arguments["city"] in schema["properties"]["city"]["enum"]


def test_a_named_tool_choice_is_a_call_unary_and_streamed(tool_upstream: str) -> None:
    url = f"{tool_upstream}/v1/chat/completions"
    doc = post_json(url, TOOL_CHAT)
    [choice] = doc["choices"]
    assert choice["finish_reason"] == "stop"  # vLLM's for a named choice ("tool_calls": auto)
    assert choice["message"]["role"] == "assistant" and not choice["message"]["content"]
    [tool_call] = choice["message"]["tool_calls"]
    check_call(tool_call)

    status, ctype, raw = call(url, TOOL_CHAT | {"stream": True, "stream_options": INCLUDE_USAGE})
    assert status == 200 and ctype.startswith("text/event-stream"), raw
    *events, done = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert done == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["stop"]
    assert choices[-1]["finish_reason"] == "stop"
    pieces = [d for c in choices for d in c["delta"].get("tool_calls") or []]
    assert pieces and {p["index"] for p in pieces} == {0}
    first, rest = pieces[0], pieces[1:]
    assert set(first) == {"id", "type", "index", "function"} and first["function"]["name"]
    assert all(set(p) == {"index", "function"} and "name" not in p["function"] for p in rest)
    joined = dict(first, function=dict(first["function"]))
    joined["function"]["arguments"] = "".join(p["function"]["arguments"] for p in pieces)
    check_call(joined)


def test_chat_unary(upstream: str) -> None:
    status, ctype, body = call(f"{upstream}/v1/chat/completions", chat(SERVED_MODEL))
    assert status == 200 and ctype.startswith("application/json")
    doc = json.loads(body)
    assert doc["object"] == "chat.completion" and doc["model"] == SERVED_MODEL
    [choice] = doc["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(
        choice["message"]["content"], str
    )
    assert choice["finish_reason"] in {"stop", "length"}
    usage = doc["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_stream_with_usage(upstream: str) -> None:
    body = chat(SERVED_MODEL, stream=True, stream_options={"include_usage": True})
    status, ctype, raw = call(f"{upstream}/v1/chat/completions", body)
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_unknown_model_is_a_json_404(upstream: str, stream: bool) -> None:
    answer = call(f"{upstream}/v1/chat/completions", chat("no-such-model", stream=stream))
    error = error_of(*answer)
    assert (error["type"], error["param"]) == ("NotFoundError", "model")
    assert "no-such-model" in error["message"]


def test_the_runtime_lora_api(upstream: str) -> None:
    name, path = "conformance-a1", str(MODEL_DIR / "a1")
    load, unload = f"{upstream}/v1/load_lora_adapter", f"{upstream}/v1/unload_lora_adapter"
    try:
        status, _, text = call(load, {"lora_name": name, "lora_path": path})
        assert status == 200 and name in text.decode()  # plain text, not JSON

        duplicate = error_of(*call(load, {"lora_name": name, "lora_path": path}))
        assert duplicate["type"] == "InvalidUserInput" and "load_inplace" in duplicate["message"]
        status, _, _ = call(load, {"lora_name": name, "lora_path": path, "load_inplace": True})
        assert status == 200

        listed = {m["id"]: m for m in json.loads(call(f"{upstream}/v1/models")[2])["data"]}
        assert (listed[name]["parent"], listed[name]["root"]) == (SERVED_MODEL, path)
        assert listed[SERVED_MODEL]["parent"] is None
        assert call(f"{upstream}/v1/chat/completions", chat(name))[0] == 200
    finally:
        assert call(unload, {"lora_name": name})[0] == 200
    gone = error_of(*call(unload, {"lora_name": name}))
    assert gone["type"] == "NotFoundError" and "cannot be found" in gone["message"]
    assert error_of(*call(f"{upstream}/v1/chat/completions", chat(name)))["param"] == "model"
    assert name not in {m["id"] for m in json.loads(call(f"{upstream}/v1/models")[2])["data"]}


def test_lora_loads_it_cannot_do(upstream: str) -> None:
    load = f"{upstream}/v1/load_lora_adapter"
    bad_path = error_of(*call(load, {"lora_name": "conformance-x", "lora_path": "/nonexistent"}))
    assert bad_path["type"] == "NotFoundError" and "/nonexistent" in bad_path["message"]
    missing = error_of(*call(load, {"lora_name": "conformance-x"}))
    assert missing["code"] == 400 and missing["param"] == "body.lora_path"


def test_health_is_an_empty_200(upstream: str) -> None:
    """Routers probe it before sending traffic (vLLM's Rust router refuses to start without)."""
    status, _, body = call(f"{upstream}/health")
    assert (status, body) == (200, b"")


# ---- recordings and SSE -------------------------------------------------------------------------
def recorded(stem: str) -> Any:
    """The body of a JSON recording of the real vLLM."""
    return json.loads((folder(stem) / f"{stem}.json").read_text())["body"]


def recorded_events(stem: str) -> list[Event]:
    """A recorded stream's events (the header's `: ...` comment lines skipped)."""
    return sse_events((folder(stem) / f"{stem}.txt").read_bytes(), named=True)


def sse_events(raw: bytes, named: bool) -> list[Event]:
    """Each SSE event as (event name, data), checking the framing: one `data:` line each and,
    with `named`, one `event:` line naming the data's own `type`."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        datas = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert len(datas) == 1 and len(names) + len(datas) == len(lines), block
        data = json.loads(datas[0])
        if named:
            assert names == [data["type"]], block
        events.append((names[0] if names else "", data))
    return events


def keys_by_type(events: list[Event]) -> dict[str, set[str]]:
    return {data["type"]: set(data) for _, data in events}


def post_json(url: str, body: dict) -> dict:
    status, ctype, raw = call(url, body)
    assert status == 200 and ctype.startswith("application/json"), (status, raw)
    return json.loads(raw)


def post_stream(url: str, body: dict, named: bool) -> list[Event]:
    status, ctype, raw = call(url, body | {"stream": True})
    assert status == 200 and ctype.startswith("text/event-stream"), (status, raw)
    return sse_events(raw, named)


# ---- Responses ----------------------------------------------------------------------------------
def check_response(doc: dict, request: dict) -> str:
    """A finished Responses object (unary, or a stream's last event); its text."""
    assert set(doc) == set(recorded("vllm_responses"))
    assert doc["object"] == "response" and doc["model"] == SERVED_MODEL
    assert doc["id"].startswith("resp_") and isinstance(doc["created_at"], int)
    assert doc["max_output_tokens"] == request["max_output_tokens"]  # the request, echoed
    if doc["status"] == "incomplete":
        assert doc["incomplete_details"] == {"reason": "max_output_tokens"}
    else:
        assert doc["status"] == "completed" and doc["incomplete_details"] is None
    [item] = doc["output"]
    template = recorded("vllm_responses")["output"][0]
    assert set(item) == set(template)
    assert (item["type"], item["role"], item["status"]) == ("message", "assistant", "completed")
    assert item["id"].startswith("msg_")
    assert [p["type"] for p in item["content"]] == ["output_text"]
    [part] = item["content"]
    assert set(part) == set(template["content"][0]) and part["annotations"] == []
    usage = doc["usage"]
    assert set(usage) == set(recorded("vllm_responses")["usage"])
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert isinstance(usage["input_tokens_details"]["cached_tokens"], int)
    assert isinstance(usage["output_tokens_details"]["reasoning_tokens"], int)
    assert isinstance(part["text"], str)
    return part["text"]


def test_responses_unary(upstream: str) -> None:
    request = RESPONSES | {"model": SERVED_MODEL}
    check_response(post_json(f"{upstream}/v1/responses", request), request)


RESPONSES_HEAD = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
RESPONSES_TAIL = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def framed_stream(
    url: str, body: dict, head: list[str], tail: list[str], delta: str, recording: str
) -> list[dict]:
    """A streamed answer's events' data, checked to open with the `head` events, close with the
    `tail` ones, carry only `delta` events (one at least) between, and to have, per event type,
    the keys of the recorded vLLM stream."""
    datas = [data for _, data in post_stream(url, body, named=True)]
    types = [d["type"] for d in datas]
    assert types[: len(head)] == head and types[-len(tail) :] == tail, types
    deltas = datas[len(head) : -len(tail)]
    assert deltas and {d["type"] for d in deltas} == {delta}
    assert {d["type"]: set(d) for d in datas} == keys_by_type(recorded_events(recording))
    return datas


def test_responses_stream(upstream: str) -> None:
    request = RESPONSES | {"model": SERVED_MODEL}
    datas = framed_stream(
        f"{upstream}/v1/responses",
        request,
        RESPONSES_HEAD,
        RESPONSES_TAIL,
        "response.output_text.delta",
        "vllm_responses_stream",
    )
    deltas = datas[4:-4]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))

    created, in_progress, added, part_added = datas[:4]
    text_done, part_done, item_done, completed = datas[-4:]
    rid = created["response"]["id"]
    for started in (created, in_progress):
        response = started["response"]
        assert (response["id"], response["status"]) == (rid, "in_progress")
        assert response["output"] == [] and response["usage"] is None
    item = added["item"]
    assert (item["type"], item["role"], item["status"], item["content"]) == (
        "message",
        "assistant",
        "in_progress",
        [],
    )
    assert part_added["part"]["type"] == "output_text" and part_added["part"]["text"] == ""
    for d in datas[3:-2]:  # the events of the one content part
        assert (d["item_id"], d["output_index"], d["content_index"]) == (item["id"], 0, 0)
    text = "".join(d["delta"] for d in deltas)
    assert text_done["text"] == part_done["part"]["text"] == text
    assert item_done["item"]["content"] == [part_done["part"]]
    assert item_done["item"]["status"] == "completed"
    assert completed["response"]["id"] == rid
    assert check_response(completed["response"], request) == text
    assert completed["response"]["output"] == [item_done["item"]]


# ---- Anthropic Messages -------------------------------------------------------------------------
def test_messages_unary(upstream: str) -> None:
    doc = post_json(f"{upstream}/v1/messages", MESSAGES | {"model": SERVED_MODEL})
    template = recorded("vllm_messages")
    assert set(doc) == set(template) and set(doc["usage"]) == set(template["usage"])
    assert (doc["type"], doc["role"], doc["model"]) == ("message", "assistant", SERVED_MODEL)
    assert isinstance(doc["id"], str) and doc["id"]
    assert [b["type"] for b in doc["content"]] == ["text"]
    assert isinstance(doc["content"][0]["text"], str)
    assert doc["stop_reason"] in {"end_turn", "max_tokens"}
    assert doc["usage"]["input_tokens"] > 0 and doc["usage"]["output_tokens"] > 0


MESSAGES_HEAD = ["message_start", "content_block_start"]
MESSAGES_TAIL = ["content_block_stop", "message_delta", "message_stop"]


def test_messages_stream(upstream: str) -> None:
    body = MESSAGES | {"model": SERVED_MODEL}
    datas = framed_stream(
        f"{upstream}/v1/messages",
        body,
        MESSAGES_HEAD,
        MESSAGES_TAIL,
        "content_block_delta",
        "vllm_messages_stream",
    )
    deltas = datas[2:-3]
    start, block_start = datas[:2]
    block_stop, message_delta, _ = datas[-3:]
    message = start["message"]
    assert (message["type"], message["role"], message["model"]) == (
        "message",
        "assistant",
        SERVED_MODEL,
    )
    assert message["content"] == [] and message["stop_reason"] is None
    assert message["usage"]["input_tokens"] > 0 and message["usage"]["output_tokens"] == 0
    assert block_start["index"] == 0
    assert block_start["content_block"] == {"type": "text", "text": ""}
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert all(isinstance(d["delta"]["text"], str) for d in deltas)
    assert block_stop["index"] == 0
    assert message_delta["delta"]["stop_reason"] in {"end_turn", "max_tokens"}
    usage = message_delta["usage"]
    assert usage["input_tokens"] == message["usage"]["input_tokens"]
    assert usage["output_tokens"] > 0


def test_count_tokens(upstream: str) -> None:
    """Its count is the prompt count a Messages answer to the same messages reports."""
    body = {"model": SERVED_MODEL, "messages": HELLO}
    doc = post_json(f"{upstream}/v1/messages/count_tokens", body)
    assert set(doc) == set(recorded("vllm_count_tokens"))
    assert isinstance(doc["input_tokens"], int) and doc["input_tokens"] > 0
    assert doc["context_management"] == {"original_input_tokens": doc["input_tokens"]}
    answer = post_json(f"{upstream}/v1/messages", MESSAGES | body)
    assert answer["usage"]["input_tokens"] == doc["input_tokens"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/responses", RESPONSES),
        ("/v1/responses", RESPONSES | {"stream": True}),
        ("/v1/messages", MESSAGES),
        ("/v1/messages", MESSAGES | {"stream": True}),
        ("/v1/messages/count_tokens", {"messages": HELLO}),
    ],
    ids=["responses", "responses-stream", "messages", "messages-stream", "count_tokens"],
)
def test_an_unknown_model_of_a_dialect_is_a_json_404(upstream: str, path: str, body: dict) -> None:
    """OpenAI's error shape on /v1/responses, Anthropic's on /v1/messages*; JSON when streamed."""
    status, ctype, raw = call(upstream + path, body | {"model": "no-such-model"})
    if path == "/v1/responses":
        error = error_of(status, ctype, raw)
        assert status == 404 and (error["type"], error["param"]) == ("NotFoundError", "model")
    else:
        assert (status, ctype.split(";")[0]) == (404, "application/json"), raw
        doc = json.loads(raw)
        assert set(doc) == {"type", "error"} and doc["type"] == "error"
        error = doc["error"]
        assert set(error) == {"type", "message"} and error["type"] == "NotFoundError"
    assert "no-such-model" in error["message"]
