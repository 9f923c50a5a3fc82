"""The demo upstream's Ollama API held to a real Ollama's wire format.

Ollama cannot run here, so tests/wire/ollama_*.json record its answers from its own sources
(docs/api.md examples, field names and types checked against api/types.go's json tags; each
file's `source` names the commit). The tests of the router's Ollama provider rest on the demo,
so each sample's request is sent to it and its answer must have the same status, content type,
keys at every level and JSON type per field. The demo may leave out only fields that Ollama's
Go structs mark `omitempty`, listed per sample below. Pure: the demo runs on a loopback thread.

The router's own Ollama answers (an Ollama client's request translated for an OpenAI-type
provider, the answer written back) are held to the same samples at the end, run on what a real
vLLM answered (tests/wire/vllm_chat*).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from serve_app.core.config import ProviderConfig
from serve_app.core.schemas import Endpoint, validate_request
from serve_app.demo.upstream import FakeUpstream, Knobs
from serve_app.dialects import ollama
from serve_app.upstreams import prepare
from serve_app.upstreams.base import Exchange
from tests.conftest import provider

WIRE = Path(__file__).parent / "wire"
MODELS = frozenset({"llama3.2", "all-minilm"})  # what the demo has on disk, as the samples' Ollama
# Fields the demo may leave out, per sample (JSON paths; `[]` is every item of a list). Each is
# `omitempty` in api/types.go; the done line's metrics are not listed: the router reads them.
OMITTABLE: dict[str, frozenset[str]] = {
    "ollama_chat": frozenset(),
    "ollama_chat_tools": frozenset({"$.message.tool_calls[].id"}),
    "ollama_chat_stream": frozenset(),
    "ollama_chat_tools_stream": frozenset({"$.message.tool_calls[].id"}),
    "ollama_generate": frozenset({"$.context"}),  # GenerateResponse.Context
    "ollama_generate_stream": frozenset({"$.context"}),
    "ollama_embed": frozenset(),
    "ollama_tags": frozenset({"$.models[].capabilities"}),  # ListModelResponse.Capabilities
    "ollama_ps": frozenset(),
    # ProgressResponse.Completed: absent until a byte of the layer has arrived.
    "ollama_pull_stream": frozenset({"$.completed"}),
    "ollama_pull_error_stream": frozenset(),
    "ollama_error_model_not_found": frozenset(),
    "ollama_error_busy": frozenset(),
    "ollama_error_tags": frozenset(),
}
# What the router may leave out of its own answers: each `omitempty` and zero or unknown to it.
# It loads no model (load_duration) and has no Ollama token ids (generate's context). Unlike the
# demo's, its tool calls carry their ids.
_LOADS_NONE = frozenset({"$.load_duration"})
ROUTER_OMITTABLE: dict[str, frozenset[str]] = {
    "ollama_chat": _LOADS_NONE,
    "ollama_chat_stream": _LOADS_NONE,
    "ollama_chat_tools": _LOADS_NONE,
    "ollama_chat_tools_stream": _LOADS_NONE,
    "ollama_generate": _LOADS_NONE | {"$.context"},
    "ollama_generate_stream": _LOADS_NONE | {"$.context"},
    "ollama_embed": _LOADS_NONE,
    "ollama_tags": OMITTABLE["ollama_tags"],
    "ollama_ps": frozenset(),
}
# Objects whose keys are the model's or the caller's, not Ollama's: only their type is held.
FREE_FORM = frozenset({"$.message.tool_calls[].function.arguments"})
TIMESTAMPS = frozenset({"created_at", "modified_at", "expires_at"})  # Go time.Time: RFC 3339
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
# The done line's counts (Go int / time.Duration: integer nanoseconds).
DONE_METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
# Never a proxy: every call goes to the demo on 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def sample(name: str) -> dict[str, Any]:
    return orjson.loads((WIRE / f"{name}.json").read_bytes())


@pytest.fixture
def demo() -> Iterator[FakeUpstream]:
    """A fresh demo per test: tests set its knobs."""
    up = FakeUpstream("llama3.2", Knobs(), served=MODELS)
    up.start_in_thread()
    try:
        yield up
    finally:
        up.stop_thread()


def call(up: FakeUpstream, request: dict[str, Any]) -> tuple[int, str, bytes]:
    """The demo's status, content type (without parameters) and body for a sample's request."""
    assert up.url.startswith("http://127.0.0.1:")
    data = orjson.dumps(request["body"]) if "body" in request else None
    req = urllib.request.Request(
        up.url + request["path"],
        data=data,
        method=request["method"],
        headers={"content-type": "application/json"} if data is not None else {},
    )
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get_content_type(), err.read()


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "bool"
    for name, cls in (("int", int), ("float", float), ("str", str), ("list", list)):
        if isinstance(value, cls):
            return name
    assert isinstance(value, dict), value
    return "object"


def assert_shape(real: Any, ours: Any, omittable: frozenset[str], path: str = "$") -> None:
    """`ours` (the demo's or the router's answer) has `real`'s keys at every level (but the
    omittable ones) and none other, and the same JSON type per field. Go writes a float32 with
    no fraction as an integer (`1`), so a float field may be either number; an int field must be
    an int."""
    want, got = kind(real), kind(ours)
    same = got in ("int", "float") if want == "float" else got == want
    assert same, f"{path}: Ollama sends {want} ({real!r}), ours is {got} ({ours!r})"
    if want == "object" and path not in FREE_FORM:
        missing = {k for k in real if k not in ours and f"{path}.{k}" not in omittable}
        assert not missing, f"{path}: ours lacks {sorted(missing)}"
        extra = set(ours) - set(real)
        assert not extra, f"{path}: Ollama sends no {sorted(extra)}"
        for key in real.keys() & ours.keys():
            if key in TIMESTAMPS:
                assert RFC3339.match(ours[key]), f"{path}.{key}: {ours[key]!r} is not RFC 3339"
            assert_shape(real[key], ours[key], omittable, f"{path}.{key}")
    elif want == "list" and real:
        assert ours, f"{path}: Ollama sends {len(real)} item(s), ours is an empty list"
        for item in ours:
            assert_shape(real[0], item, omittable, f"{path}[]")


def paths(doc: Any, path: str = "$") -> Iterator[str]:
    """Every JSON path in a sample (to check the omittable lists name real fields)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield f"{path}.{key}"
            yield from paths(value, f"{path}.{key}")
    elif isinstance(doc, list):
        for item in doc:
            yield from paths(item, f"{path}[]")


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\n"), "NDJSON lines each end with a newline"
    return [orjson.loads(line) for line in raw.splitlines()]


def test_every_sample_is_listed_and_its_omittable_fields_exist() -> None:
    """A sample without a list (or a list naming no field) would make the tests below lax."""
    assert {p.stem for p in WIRE.glob("ollama_*.json")} == set(OMITTABLE)
    assert set(ROUTER_OMITTABLE) <= set(OMITTABLE)
    for name, omittable in OMITTABLE.items():
        doc = sample(name)
        assert doc["source"].startswith("ollama/ollama@") and isinstance(doc["status"], int)
        bodies = doc["body"] if isinstance(doc["body"], list) else [doc["body"]]
        present = {p for body in bodies for p in paths(body)}
        assert omittable | ROUTER_OMITTABLE.get(name, frozenset()) <= present, name


@pytest.mark.parametrize(
    "name", ["ollama_chat", "ollama_chat_tools", "ollama_generate", "ollama_embed", "ollama_tags"]
)
def test_unary_answers_have_ollamas_shape(demo: FakeUpstream, name: str) -> None:
    s = sample(name)
    status, ctype, raw = call(demo, s["request"])
    assert (status, ctype) == (s["status"], "application/json"), raw[:300]
    assert_shape(s["body"], orjson.loads(raw), OMITTABLE[name])


def test_ps_lists_the_loaded_models_in_ollamas_shape(demo: FakeUpstream) -> None:
    s = sample("ollama_ps")
    status, ctype, raw = call(demo, s["request"])
    assert (status, ctype) == (s["status"], "application/json")
    doc = orjson.loads(raw)
    assert doc["models"], "the demo has models loaded"
    assert_shape(s["body"], doc, OMITTABLE["ollama_ps"])
    # Ollama lists full names (`llama3.2` is `llama3.2:latest`).
    assert {m["name"] for m in doc["models"]} == {f"{m}:latest" for m in MODELS}


@pytest.mark.parametrize(
    "name", ["ollama_chat_stream", "ollama_chat_tools_stream", "ollama_generate_stream"]
)
def test_streams_are_ndjson_ending_with_the_done_line_and_its_counts(
    demo: FakeUpstream, name: str
) -> None:
    s = sample(name)
    status, ctype, raw = call(demo, s["request"])
    assert (status, ctype) == (s["status"], "application/x-ndjson")
    lines = ndjson(raw)
    *parts, last = lines
    assert parts, "a stream has lines before the done line"
    first, done = s["body"][0], s["body"][-1]
    for line in parts:
        assert line["done"] is False
        assert_shape(first, line, OMITTABLE[name])
    assert last["done"] is True
    assert_shape(done, last, OMITTABLE[name])
    for field in ("done_reason", *DONE_METRICS):
        assert field in last, f"the done line lacks {field}"
    assert all(kind(last[f]) == "int" and last[f] > 0 for f in DONE_METRICS), last
    assert last["done_reason"] in ("stop", "length")


def test_streamed_pieces_and_unary_answer_agree(demo: FakeUpstream) -> None:
    """What a client sees either way: the pieces join to the unary text, eval_count matches."""
    for path, field in (("/api/chat", "message"), ("/api/generate", "response")):
        request = sample("ollama_chat" if field == "message" else "ollama_generate")["request"]
        unary = orjson.loads(call(demo, request)[2])
        streaming = {**request, "body": {**request["body"], "stream": True}}
        streamed = ndjson(call(demo, streaming)[2])

        def text(doc: dict[str, Any], f: str = field) -> str:
            return doc[f]["content"] if f == "message" else doc[f]

        assert "".join(text(line) for line in streamed) == text(unary), path
        assert streamed[-1]["eval_count"] == unary["eval_count"], path


def test_pull_streams_ollamas_progress_lines_then_success(demo: FakeUpstream) -> None:
    s = sample("ollama_pull_stream")
    status, ctype, raw = call(demo, s["request"])
    assert (status, ctype) == (s["status"], "application/x-ndjson")
    lines = ndjson(raw)
    by_status = {line["status"]: line for line in s["body"]}
    downloading = s["body"][1]
    for line in lines:
        model = downloading if "digest" in line else by_status.get(line["status"])
        assert model is not None, f"Ollama sends no status {line['status']!r}"
        assert_shape(model, line, OMITTABLE["ollama_pull_stream"])
        if "digest" in line:  # download.go: "pulling " + the digest's first 12 hex digits
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", line["digest"]), line
            assert line["status"] == f"pulling {line['digest'][7:19]}"

    def order(docs: list[dict[str, Any]]) -> list[str]:
        steps = ["pulling <digest>" if "digest" in d else d["status"] for d in docs]
        return [step for i, step in enumerate(steps) if i == 0 or steps[i - 1] != step]

    assert order(lines) == order(s["body"])


def test_a_pull_that_fails_ends_with_an_error_line(demo: FakeUpstream) -> None:
    demo.knobs = Knobs(pull_fail_after=0)
    s = sample("ollama_pull_error_stream")
    status, ctype, raw = call(demo, s["request"])
    assert (status, ctype) == (s["status"], "application/x-ndjson")
    lines = ndjson(raw)
    assert lines[0] == s["body"][0]
    assert_shape(s["body"][-1], lines[-1], OMITTABLE["ollama_pull_error_stream"])


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "stream": False}),
        ("/api/generate", {"prompt": "x"}),
        ("/api/embed", {"input": "x"}),
    ],
)
def test_a_missing_model_is_ollamas_404(
    demo: FakeUpstream, path: str, extra: dict[str, Any]
) -> None:
    s = sample("ollama_error_model_not_found")
    request = {"method": "POST", "path": path, "body": {"model": "nope", **extra}}
    status, ctype, raw = call(demo, request)
    assert (status, ctype) == (s["status"], "application/json")
    assert orjson.loads(raw) == s["body"]  # the same words: `model 'nope' not found`


def test_a_tagged_name_finds_the_model(demo: FakeUpstream) -> None:
    """Ollama takes `llama3.2` and `llama3.2:latest` for the same model."""
    request = sample("ollama_chat")["request"]
    tagged = {**request, "body": {**request["body"], "model": "llama3.2:latest"}}
    status, _, raw = call(demo, tagged)
    assert status == 200 and orjson.loads(raw)["model"] == "llama3.2:latest"


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("ollama_error_busy", Knobs(fail_status=503)),
        ("ollama_error_tags", Knobs(tags_status=500)),
    ],
)
def test_failures_are_ollamas_error_body(demo: FakeUpstream, name: str, knobs: Knobs) -> None:
    demo.knobs = knobs
    s = sample(name)
    status, ctype, raw = call(demo, s["request"])
    assert (status, ctype) == (s["status"], "application/json")
    assert_shape(s["body"], orjson.loads(raw), OMITTABLE[name])


# --- the router's own answers --------------------------------------------------------------------
# Each sample's request goes the ingress's way to an OpenAI-type provider (providers.prepare: the
# request translated, a TranslatedExchange writing the answer back in Ollama's shape), answered
# with what a real vLLM sent: a greedy 4-token chat (finish "length"), unary and streamed. The
# completion, tool-call and embedding answers are built in vLLM's shapes from it.
VLLM_CHAT = orjson.loads((WIRE / "vllm_chat.json").read_bytes())
VLLM_STREAM = (WIRE / "vllm_chat_stream.txt").read_bytes()
_VLLM_CHUNKS = [orjson.loads(e[6:]) for e in VLLM_STREAM.split(b"\n\n") if e.startswith(b"data: {")]
TOOL_CALLS = [  # vLLM's call ids: the router must carry them
    ("chatcmpl-tool-8d1e5a0f3c2b4e6a", "get_weather", '{"city": "Tokyo"}'),
    ("chatcmpl-tool-0b9c7e2d4f6a8c1e", "get_weather", '{"city": "Paris"}'),
]
PAUSE_S = 0.02  # the upstream's time before its answer (unary) or first and last chunks (stream)
PAUSE_NS = int(PAUSE_S * 0.9e9)  # what the durations must hold at least (a timer may fire early)
_OPENAI = ProviderConfig.model_validate(provider("p", "http://127.0.0.1:9", "openai"))


def _sse(docs: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in docs) + b"data: [DONE]\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """A chunk as the recorded vLLM writes one, carrying `delta`."""
    like = _VLLM_CHUNKS[1]
    return like | {"choices": [like["choices"][0] | {"delta": delta, "finish_reason": finish}]}


def _as_completion(doc: dict[str, Any]) -> dict[str, Any]:
    """A recorded chat answer or chunk as vLLM's /v1/completions writes it (choices' `text`)."""
    choices = [
        {
            "index": c["index"],
            "text": (c.get("message") or c.get("delta") or {}).get("content") or "",
            "logprobs": None,
            "finish_reason": c["finish_reason"],
        }
        for c in doc["choices"]
    ]
    return doc | {"object": "text_completion", "choices": choices}


VLLM_COMPLETION = _as_completion(VLLM_CHAT)
VLLM_COMPLETION_STREAM = _sse(
    [_as_completion(c) if c["choices"] else c for c in _VLLM_CHUNKS]  # the last: usage only
)
VLLM_TOOLS = VLLM_CHAT | {
    "choices": [
        VLLM_CHAT["choices"][0]
        | {
            "message": VLLM_CHAT["choices"][0]["message"]
            | {
                "content": None,
                "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                    for i, n, a in TOOL_CALLS
                ],
            },
            "finish_reason": "tool_calls",
        }
    ]
}


def _tool_chunks(n: int, call_id: str, name: str, args: str) -> list[dict[str, Any]]:
    """Call `n` as vLLM streams it: its id and name, then its arguments."""
    head = {"id": call_id, "type": "function", "index": n, "function": {"name": name}}
    rest = {"index": n, "function": {"arguments": args}}
    return [_chunk({"tool_calls": [head]}), _chunk({"tool_calls": [rest]})]


VLLM_TOOLS_STREAM = _sse(
    [
        _VLLM_CHUNKS[0],  # the role
        *(chunk for n, call in enumerate(TOOL_CALLS) for chunk in _tool_chunks(n, *call)),
        _chunk({}, "tool_calls"),
        _VLLM_CHUNKS[-1],  # the usage
    ]
)
VLLM_EMBEDDING = {  # vLLM's /v1/embeddings answer
    "id": "embd-5b3c0e8f9a7d4c21",
    "object": "list",
    "created": 1796169810,
    "model": "all-minilm",
    "data": [{"index": 0, "object": "embedding", "embedding": [0.0100710, -0.0017594, 0.0500722]}],
    "usage": {"prompt_tokens": 8, "total_tokens": 8, "completion_tokens": 0},
}


def _router_exchange(name: str) -> Exchange:
    """The exchange the router prepares for a sample's request to an OpenAI-type provider."""
    request = sample(name)["request"]
    body = orjson.dumps(request["body"])
    meta = validate_request(Endpoint(request["path"].removeprefix("/")), body, "r")
    return prepare(_OPENAI, meta, body)


def router_unary(name: str, upstream: dict[str, Any]) -> dict[str, Any]:
    exchange = _router_exchange(name)
    time.sleep(PAUSE_S)
    out = exchange.unary(200, orjson.dumps(upstream))
    return orjson.loads(out)


async def router_stream(name: str, upstream: bytes) -> list[dict[str, Any]]:
    exchange = _router_exchange(name)
    events = [e + b"\n\n" for e in upstream.split(b"\n\n") if e]

    async def chunks() -> AsyncIterator[bytes]:
        for n, event in enumerate(events):
            if n in (0, len(events) - 1):  # the prompt's evaluation; the rest of the generation
                await asyncio.sleep(PAUSE_S)
            yield event

    return ndjson(b"".join([out async for out in exchange.stream(chunks())]))


def assert_no_zero_metrics(doc: dict[str, Any]) -> None:
    """Ollama's Metrics are all omitempty: it sends no zero."""
    zeros = [f for f in DONE_METRICS if doc.get(f) == 0]
    assert not zeros, f"Ollama leaves out the zero {zeros}"


def assert_durations(done: dict[str, Any]) -> None:
    """The phases' durations are within the total, and hold the time the upstream took."""
    assert (
        PAUSE_NS <= done["prompt_eval_duration"] + done["eval_duration"] <= done["total_duration"]
    ), done


def assert_calls_carried(message: dict[str, Any]) -> None:
    """The upstream's call ids, and each call's index in the message."""
    assert [(c["id"], c["function"]["index"]) for c in message["tool_calls"]] == [
        (i, n) for n, (i, _, _) in enumerate(TOOL_CALLS)
    ]


@pytest.mark.parametrize(
    ("name", "upstream"), [("ollama_chat", VLLM_CHAT), ("ollama_generate", VLLM_COMPLETION)]
)
def test_router_unary_answers_have_ollamas_shape(name: str, upstream: dict[str, Any]) -> None:
    doc = router_unary(name, upstream)
    assert_shape(sample(name)["body"], doc, ROUTER_OMITTABLE[name])
    assert_no_zero_metrics(doc)
    assert_durations(doc)


@pytest.mark.parametrize(
    ("name", "upstream"),
    [("ollama_chat_stream", VLLM_STREAM), ("ollama_generate_stream", VLLM_COMPLETION_STREAM)],
)
async def test_router_streams_end_with_ollamas_done_line(name: str, upstream: bytes) -> None:
    done = (await router_stream(name, upstream))[-1]
    assert_shape(sample(name)["body"][-1], done, ROUTER_OMITTABLE[name])
    assert_no_zero_metrics(done)
    assert_durations(done)
    # Measured: the first chunk came after one pause, the rest of the stream after another.
    assert min(done["prompt_eval_duration"], done["eval_duration"]) >= PAUSE_NS, done


def test_router_tool_calls_have_ollamas_shape_and_the_upstreams_ids() -> None:
    doc = router_unary("ollama_chat_tools", VLLM_TOOLS)
    assert_shape(sample("ollama_chat_tools")["body"], doc, ROUTER_OMITTABLE["ollama_chat_tools"])
    assert_calls_carried(doc["message"])


async def test_router_streamed_tool_calls_have_ollamas_shape_and_the_upstreams_ids() -> None:
    name = "ollama_chat_tools_stream"
    calls, done = await router_stream(name, VLLM_TOOLS_STREAM)
    real = sample(name)["body"]
    assert_shape(real[0], calls, ROUTER_OMITTABLE[name])
    assert_calls_carried(calls["message"])
    assert_shape(real[-1], done, ROUTER_OMITTABLE[name])


def test_router_embed_answer_has_ollamas_shape() -> None:
    doc = router_unary("ollama_embed", VLLM_EMBEDDING)
    assert_shape(sample("ollama_embed")["body"], doc, ROUTER_OMITTABLE["ollama_embed"])
    assert_no_zero_metrics(doc)


def test_router_tags_entries_have_ollamas_shape() -> None:
    """As serve_app/api/ollama.py lists the gateway's models."""
    entries = {"models": [ollama.model_entry("llama3.2", "chat", None)]}
    assert_shape(sample("ollama_tags")["body"], entries, ROUTER_OMITTABLE["ollama_tags"])


def test_router_ps_entries_have_ollamas_shape_and_never_expire() -> None:
    """A loaded model's entry. The router's models do not expire: `ollama ps` shows Ollama's
    far-off expiry (keep_alive -1) as Forever."""
    entry = ollama.running_entry("llama3.2", "chat", None)
    assert_shape(sample("ollama_ps")["body"], {"models": [entry]}, ROUTER_OMITTABLE["ollama_ps"])
    forever = datetime.now(timezone.utc) + timedelta(days=20 * 365)
    assert datetime.fromisoformat(entry["expires_at"]) > forever
