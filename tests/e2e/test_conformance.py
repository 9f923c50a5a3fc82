"""The demo upstream held to a real vLLM: the same wire assertions (status codes, body shapes)
against both. A difference found here is fixed in `serve_app/demo_upstream.py`. Run by `make e2e`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from serve_app.demo_upstream import FakeUpstream
from tests.e2e.vllm_server import MODEL_DIR, SERVED_MODEL, VllmServer

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "hello there"}]


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
