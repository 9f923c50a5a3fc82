"""OpenAI <-> Ollama translation, both directions, unary and streamed."""

from __future__ import annotations

import orjson
import pytest

from serve_app.core.config import ProviderConfig
from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint, RequestMeta, validate_request
from serve_app.upstreams import prepare
from serve_app.upstreams.ollama import (
    OllamaExchange,
    StreamTranslator,
    from_ollama_response,
    to_ollama_request,
)


def _part(part: dict) -> dict:
    return {"role": "user", "content": [part]}


def _calls(calls: object) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": calls}


def _fn(arguments: object) -> dict:
    return {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}


def test_chat_request_translation() -> None:
    req = {
        "model": "m",
        "max_tokens": 9,
        "top_p": 0.5,
        "stop": ["a", "b"],
        "seed": 3,
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look "},
                    {"type": "text", "text": "here"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x": 1}'},
                    }
                ],
            },
            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
        ],
    }
    out = to_ollama_request(Endpoint.CHAT, req, "llama:1b", True, "35m")
    assert out["model"] == "llama:1b" and out["stream"] is True and out["keep_alive"] == "35m"
    assert out["options"] == {"top_p": 0.5, "seed": 3, "num_predict": 9, "stop": ["a", "b"]}
    assert out["format"] == "json"
    assert out["messages"][0] == {"role": "system", "content": "be brief"}
    assert out["messages"][1] == {"role": "user", "content": "look here", "images": ["QUJD"]}
    assert out["messages"][2]["tool_calls"] == [{"function": {"name": "f", "arguments": {"x": 1}}}]
    assert out["messages"][3] == {"role": "tool", "content": "42", "tool_name": "f"}


def test_json_schema_format_and_no_keep_alive() -> None:
    schema = {"type": "object"}
    req = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }
    out = to_ollama_request(Endpoint.CHAT, req, "m", False, None)
    assert out["format"] == schema and "keep_alive" not in out and "options" not in out


@pytest.mark.parametrize(
    ("endpoint", "req"),
    [
        (
            Endpoint.CHAT,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
                        ],
                    }
                ]
            },
        ),
        (Endpoint.COMPLETIONS, {"prompt": ["a", "b"]}),
        (Endpoint.EMBEDDINGS, {"input": [1, 2, 3]}),
        # What a client may send that Ollama's API cannot say: each a 400, not an exception.
        (Endpoint.COMPLETIONS, {"prompt": "p", "response_format": "json"}),
        (Endpoint.COMPLETIONS, {"prompt": "p", "response_format": {"type": "json"}}),
        (Endpoint.COMPLETIONS, {"prompt": "p", "response_format": {"type": "json_schema"}}),
        (
            Endpoint.COMPLETIONS,
            {"prompt": "p", "response_format": {"type": "json_schema", "json_schema": "s"}},
        ),
        (Endpoint.CHAT, {"messages": [_part({"type": "image_url", "image_url": "data:,"})]}),
        (Endpoint.CHAT, {"messages": [_part({"type": "image_url", "image_url": {"u": 1}})]}),
        (Endpoint.CHAT, {"messages": [_part({"type": "input_audio", "input_audio": {}})]}),
        (Endpoint.CHAT, {"messages": [_calls("f")]}),
        (Endpoint.CHAT, {"messages": [_calls(["f"])]}),
        (Endpoint.CHAT, {"messages": [_calls([{"function": "f"}])]}),
        (Endpoint.CHAT, {"messages": [_calls([_fn("{not json")])]}),
        (Endpoint.CHAT, {"messages": [_calls([_fn("[1, 2]")])]}),
        (Endpoint.CHAT, {"messages": [_calls([_fn(7)])]}),
    ],
)
def test_what_ollama_cannot_take_is_a_400(endpoint: Endpoint, req: dict) -> None:
    with pytest.raises(RouterError) as info:
        to_ollama_request(endpoint, {"model": "m", **req}, "m", False, None)
    assert info.value.status == 400


def test_stream_options_that_are_not_an_object_are_a_400() -> None:
    ollama = ProviderConfig(id="o", api_host="http://h:1", api_type="ollama", input_size=99)
    doc = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": "y"}
    body = orjson.dumps(doc)
    with pytest.raises(RouterError) as info:
        prepare(ollama, validate_request(Endpoint.CHAT, body, "r"), body)
    assert (info.value.status, info.value.param) == (400, "stream_options")


def test_chat_response_translation_with_tool_calls() -> None:
    doc = {
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"q": "x"}}}],
        },
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 3,
        "eval_count": 4,
    }
    out = from_ollama_response(Endpoint.CHAT, doc, "m", "id1", 5)
    assert out["object"] == "chat.completion" and out["id"] == "id1" and out["created"] == 5
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and orjson.loads(call["function"]["arguments"]) == {"q": "x"}
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_generate_and_embed_response_translation() -> None:
    gen = from_ollama_response(
        Endpoint.COMPLETIONS, {"response": "hi", "done_reason": "length"}, "m", "c", 1
    )
    assert gen["object"] == "text_completion"
    assert gen["choices"][0]["text"] == "hi" and gen["choices"][0]["finish_reason"] == "length"
    emb = from_ollama_response(
        Endpoint.EMBEDDINGS, {"embeddings": [[1.0], [2.0]], "prompt_eval_count": 2}, "m", "", 1
    )
    assert [d["embedding"] for d in emb["data"]] == [[1.0], [2.0]]
    assert emb["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def events(raw: bytes) -> list:
    return [
        b[6:] if b[6:] == b"[DONE]" else orjson.loads(b[6:])
        for b in raw.split(b"\n\n")
        if b.startswith(b"data: ")
    ]


def test_stream_translation() -> None:
    tr = StreamTranslator(Endpoint.CHAT, "m", "id", 1, include_usage=True)
    raw = tr.line({"message": {"content": "Hel"}, "done": False})
    raw += tr.line({"message": {"content": "lo"}, "done": False})
    raw += tr.line(
        {
            "message": {"content": ""},
            "done": True,
            "done_reason": "length",
            "prompt_eval_count": 2,
            "eval_count": 2,
        }
    )
    ev = events(raw)
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert ev[1]["choices"][0]["delta"] == {"content": "lo"}
    assert ev[2]["choices"][0]["finish_reason"] == "length"
    assert ev[3]["choices"] == [] and ev[3]["usage"]["total_tokens"] == 4
    assert ev[4] == b"[DONE]"
    assert {e["object"] for e in ev[:4]} == {"chat.completion.chunk"}


def test_stream_error_line_becomes_an_error_event() -> None:
    tr = StreamTranslator(Endpoint.COMPLETIONS, "m", "id", 1, include_usage=False)
    ev = events(tr.line({"error": "out of memory"}))
    assert ev[0]["error"]["message"] == "out of memory"


async def test_exchange_splits_ndjson_across_chunk_boundaries() -> None:
    provider = ProviderConfig(
        id="o", api_host="http://127.0.0.1:11434/", api_type="ollama", input_size=10
    )
    meta = RequestMeta(Endpoint.COMPLETIONS, "m", True, 1, False, "r")
    ex = OllamaExchange(provider, meta, b'{"model": "m", "prompt": "p"}')
    assert ex.url == "http://127.0.0.1:11434/api/generate"
    lines = (
        b'{"response":"ab","done":false}\n{"response":"cd","done":false}\n'
        b'{"response":"","done":true,"done_reason":"stop"}'
    )

    async def chunks():
        for i in range(0, len(lines), 7):
            yield lines[i : i + 7]

    out = b"".join([c async for c in ex.stream(chunks())])
    ev = events(out)
    assert [e["choices"][0]["text"] for e in ev[:-1]] == ["ab", "cd", ""]
    assert ev[-1] == b"[DONE]"


def test_ollama_error_body_becomes_openai_error() -> None:
    provider = ProviderConfig(id="o", api_host="http://h:1/v1", api_type="ollama", input_size=10)
    meta = RequestMeta(Endpoint.CHAT, "m", False, 1, False, "r")
    ex = OllamaExchange(provider, meta, b'{"model":"m","messages":[]}')
    assert ex.url == "http://h:1/api/chat"
    body = ex.unary(404, b'{"error":"model \\"m\\" not found"}')
    assert orjson.loads(body)["error"]["message"] == 'model "m" not found'
