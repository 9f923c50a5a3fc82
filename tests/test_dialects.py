"""Dialect translations (pure): Ollama, Responses and Anthropic requests in the internal form,
and internal answers (unary and streamed, in vLLM's wire shape) back in each dialect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from serve_app.core.config import ProviderConfig
from serve_app.core.errors import RouterError, error_body
from serve_app.core.schemas import Endpoint, validate_request
from serve_app.dialects.translate import error_in_dialect, stream_error, translation
from serve_app.dialects.usage import StreamMeter, counts_of
from serve_app.upstreams import prepare
from serve_app.upstreams.ollama import OllamaNativeExchange
from serve_app.upstreams.openai import OpenAIExchange
from serve_app.upstreams.translated import TranslatedExchange
from tests.conftest import provider

# Recorded from the real vLLM (tests/e2e/record_wire.py): greedy, 4 tokens, so finish "length".
WIRE = Path(__file__).parent / "wire"
VLLM_CHAT = orjson.loads((WIRE / "vllm_chat.json").read_bytes())
VLLM_STREAM = (WIRE / "vllm_chat_stream.txt").read_bytes()
_CHUNKS = [orjson.loads(e[6:]) for e in VLLM_STREAM.split(b"\n\n") if e.startswith(b"data: {")]
PIECES = [c["choices"][0]["delta"]["content"] for c in _CHUNKS if c["choices"]][1:]  # role first
TEXT = "".join(PIECES)
USAGE = _CHUNKS[-1]["usage"]


def _sse(*docs: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in docs) + b"data: [DONE]\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


TOOL_STREAM = _sse(
    _chunk({"role": "assistant", "content": ""}),
    _chunk(
        {"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "get", "arguments": ""}}]}
    ),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "tool_calls"),
    {"id": "c1", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 9}},
)
CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hi there",
                "tool_calls": [
                    {
                        "id": "call_x",
                        "type": "function",
                        "function": {"name": "get", "arguments": '{"a": 1}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
}


def _provider(api_type: str, **extra: Any) -> ProviderConfig:
    return ProviderConfig.model_validate(provider("p", "http://127.0.0.1:9", api_type, **extra))


def _exchange(endpoint: Endpoint, doc: dict[str, Any], api_type: str = "openai", **extra: Any):
    body = orjson.dumps(doc)
    return prepare(_provider(api_type, **extra), validate_request(endpoint, body, "r"), body)


async def _pieces(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):  # cut anywhere, as TCP may
        yield data[i : i + size]


def _streamed(exchange: Any, upstream: bytes) -> bytes:
    async def run() -> bytes:
        return b"".join([c async for c in exchange.stream(_pieces(upstream))])

    return asyncio.run(run())


def _events(data: bytes) -> list[dict[str, Any]]:
    """SSE `event:` + `data:` pairs, checked to agree."""
    out = []
    for block in data.split(b"\n\n"):
        if not block.strip():
            continue
        kind, payload = block.split(b"\n")
        doc = orjson.loads(payload.removeprefix(b"data: "))
        assert kind == b"event: " + doc["type"].encode()
        out.append(doc)
    return out


# --- where a request goes ------------------------------------------------------------------------


def test_vllm_takes_responses_and_messages_as_they_are_others_get_chat() -> None:
    msg = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    native = _exchange(Endpoint.MESSAGES, msg, "vllm", model_path="tiny")
    assert isinstance(native, OpenAIExchange) and native.url == "http://127.0.0.1:9/v1/messages"
    assert orjson.loads(native.body) == msg | {"model": "tiny"}
    translated = _exchange(Endpoint.MESSAGES, msg, "openai")
    assert isinstance(translated, TranslatedExchange)
    assert translated.url == "http://127.0.0.1:9/v1/chat/completions"
    resp = _exchange(Endpoint.RESPONSES, {"model": "m", "input": "hi"}, "vllm")
    assert resp.url == "http://127.0.0.1:9/v1/responses"


def test_ollama_clients_reach_ollama_providers_as_they_are() -> None:
    doc = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "think": True,
        "keep_alive": "1m",
    }
    native = _exchange(Endpoint.OLLAMA_CHAT, doc, "ollama", model_path="llama3:8b", keep_alive="5m")
    assert isinstance(native, OllamaNativeExchange) and native.url == "http://127.0.0.1:9/api/chat"
    assert orjson.loads(native.body) == doc | {"model": "llama3:8b"}  # the client's keep_alive wins
    line = orjson.dumps({"model": "llama3:8b", "done": False}) + b"\n"
    assert orjson.loads(_streamed(native, line * 2).split(b"\n")[1])["model"] == "m"
    translated = _exchange(Endpoint.OLLAMA_CHAT, doc, "vllm")
    assert translated.url == "http://127.0.0.1:9/v1/chat/completions"
    assert "keep_alive" not in orjson.loads(translated.body)


def test_an_ollama_provider_gets_other_dialects_through_the_internal_form() -> None:
    msg = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    ex = _exchange(Endpoint.MESSAGES, msg, "ollama", model_path="qwen")
    assert isinstance(ex, TranslatedExchange) and ex.url == "http://127.0.0.1:9/api/chat"
    sent = orjson.loads(ex.body)
    assert sent["model"] == "qwen" and sent["options"] == {"num_predict": 5}
    ollama_answer = {
        "message": {"content": "yo"},
        "done": True,
        "prompt_eval_count": 3,
        "eval_count": 1,
    }
    out = ex.unary(200, orjson.dumps(ollama_answer))
    doc = orjson.loads(out)
    assert doc["content"] == [{"type": "text", "text": "yo"}]
    assert doc["usage"] == {"input_tokens": 3, "output_tokens": 1}


# --- Ollama --------------------------------------------------------------------------------------


def test_ollama_chat_in_the_internal_form() -> None:
    t = translation(
        Endpoint.OLLAMA_CHAT,
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is this", "images": ["iVBORw0KGgo="]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
                },
                {"role": "tool", "content": "42", "tool_name": "f"},
            ],
            "options": {"temperature": 0.2, "num_predict": 9, "top_k": 5, "stop": ["\n"]},
            "format": {"type": "object"},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        True,
    )
    assert t.endpoint is Endpoint.CHAT
    body = t.body
    assert body["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    call = body["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": '{"x":1}'}
    assert body["messages"][3] == {
        "role": "tool",
        "content": "42",
        "tool_call_id": call["id"],
        "name": "f",
    }
    assert (body["temperature"], body["max_tokens"], body["stop"]) == (0.2, 9, ["\n"])
    assert "top_k" not in body  # only Ollama knows it
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert body["stream_options"] == {"include_usage": True} and body["tools"]


def test_ollama_generate_is_a_completion_unless_it_carries_a_system_prompt() -> None:
    plain = translation(Endpoint.OLLAMA_GENERATE, {"model": "m", "prompt": "2+2="}, False)
    assert plain.endpoint is Endpoint.COMPLETIONS and plain.body["prompt"] == "2+2="
    framed = translation(
        Endpoint.OLLAMA_GENERATE, {"model": "m", "prompt": "hi", "system": "s"}, False
    )
    assert framed.endpoint is Endpoint.CHAT
    assert [m["role"] for m in framed.body["messages"]] == ["system", "user"]


def test_ollama_chat_answers_unary_and_streamed() -> None:
    ex = _exchange(
        Endpoint.OLLAMA_CHAT, {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    )
    doc = orjson.loads(ex.unary(200, orjson.dumps(CHAT_ANSWER)))
    assert doc["message"] == {
        "role": "assistant",
        "content": "Hi there",
        # Ollama's shape: the upstream's call id, and the call's index in the message.
        "tool_calls": [
            {"id": "call_x", "function": {"index": 0, "name": "get", "arguments": {"a": 1}}}
        ],
    }
    assert (doc["done"], doc["done_reason"], doc["prompt_eval_count"], doc["eval_count"]) == (
        True,
        "stop",
        11,
        4,
    )
    lines = [orjson.loads(ln) for ln in _streamed(ex, VLLM_STREAM).splitlines()]
    assert [ln["message"]["content"] for ln in lines] == [*PIECES, ""]
    assert [ln["done"] for ln in lines] == [False] * len(PIECES) + [True]
    last = lines[-1]
    assert (last["done_reason"], last["prompt_eval_count"], last["eval_count"]) == (
        "length",
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
    )
    plain = orjson.loads(ex.unary(200, orjson.dumps(VLLM_CHAT)))
    assert plain["message"] == {"role": "assistant", "content": TEXT}  # reasoning null: none
    assert plain["done_reason"] == "length" and plain["eval_count"] == USAGE["completion_tokens"]


def test_ollama_embed_and_legacy_embeddings_answers() -> None:
    answer = {
        "data": [{"embedding": [0.1, 0.2]}, {"embedding": [0.3, 0.4]}],
        "usage": {"prompt_tokens": 4},
    }
    ex = _exchange(Endpoint.OLLAMA_EMBED, {"model": "m", "input": ["a", "b"]})
    assert orjson.loads(ex.body)["input"] == ["a", "b"]
    doc = orjson.loads(ex.unary(200, orjson.dumps(answer)))
    assert doc["embeddings"] == [[0.1, 0.2], [0.3, 0.4]] and doc["prompt_eval_count"] == 4
    legacy = _exchange(Endpoint.OLLAMA_EMBEDDINGS, {"model": "m", "prompt": "a"})
    assert orjson.loads(legacy.unary(200, orjson.dumps(answer))) == {"embedding": [0.1, 0.2]}


def test_ollama_streams_default_to_on() -> None:
    chat = b'{"model": "m", "messages": [{"role": "user", "content": "q"}]}'
    assert validate_request(Endpoint.OLLAMA_CHAT, chat, "r").stream
    off = b'{"model": "m", "stream": false, "messages": [{"role": "user", "content": "q"}]}'
    assert not validate_request(Endpoint.OLLAMA_CHAT, off, "r").stream
    assert not validate_request(Endpoint.OLLAMA_EMBED, b'{"model": "m", "input": "x"}', "r").stream


# --- Responses -----------------------------------------------------------------------------------


def test_responses_input_items_in_the_internal_form() -> None:
    t = translation(
        Endpoint.RESPONSES,
        {
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
            "tools": [{"type": "function", "name": "get", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get"},
            "max_output_tokens": 20,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        },
        False,
    )
    msgs = t.body["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[1]["content"] == [{"type": "text", "text": "weather?"}]
    assert msgs[2]["tool_calls"][0]["id"] == "c1" and msgs[3]["tool_call_id"] == "c1"
    assert t.body["tools"] == [
        {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}
    ]
    assert t.body["tool_choice"] == {"type": "function", "function": {"name": "get"}}
    assert t.body["max_tokens"] == 20 and t.body["response_format"]["json_schema"]["name"] == "w"


def test_responses_refuse_hosted_tools_and_leave_out_earlier_reasoning() -> None:
    # A conversation continued from a reasoning model's turn: its thoughts are not chat input.
    items = [
        {"type": "message", "role": "user", "content": "x"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "y"}]},
        {"type": "message", "role": "user", "content": "z"},
    ]
    t = translation(Endpoint.RESPONSES, {"model": "m", "input": items}, False)
    assert [m["role"] for m in t.body["messages"]] == ["user", "assistant", "user"]
    with pytest.raises(RouterError) as info:
        translation(
            Endpoint.RESPONSES,
            {"model": "m", "input": "x", "tools": [{"type": "web_search"}]},
            False,
        )
    assert info.value.status == 400


def test_responses_text_format_of_an_unknown_type_is_a_400() -> None:
    doc = {"model": "m", "input": "x", "text": {"format": {"type": "json"}}}
    with pytest.raises(RouterError) as info:
        translation(Endpoint.RESPONSES, doc, False)
    assert (info.value.status, info.value.param) == (400, "text.format")


def test_responses_answers_unary_and_streamed() -> None:
    ex = _exchange(Endpoint.RESPONSES, {"model": "m", "input": "q", "max_output_tokens": 2})
    doc = orjson.loads(ex.unary(200, orjson.dumps(CHAT_ANSWER)))
    assert doc["object"] == "response" and doc["status"] == "completed" and doc["model"] == "m"
    assert [o["type"] for o in doc["output"]] == ["message", "function_call"]
    assert doc["output"][0]["content"][0]["text"] == "Hi there"
    assert doc["output"][1]["call_id"] == "call_x" and doc["usage"]["total_tokens"] == 15
    events = _events(_streamed(ex, VLLM_STREAM))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(PIECES),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # vLLM stopped at max_tokens
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = events[-1]["response"]
    assert done["status"] == "incomplete" and done["incomplete_details"] == {
        "reason": "max_output_tokens"
    }
    assert done["output"][0]["content"][0]["text"] == TEXT
    assert done["usage"]["input_tokens"] == USAGE["prompt_tokens"]


def test_responses_stream_tool_calls_as_function_call_items() -> None:
    ex = _exchange(Endpoint.RESPONSES, {"model": "m", "input": "q"})
    events = _events(_streamed(ex, TOOL_STREAM))
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == '{"city": "Paris"}'
    assert events[-1]["response"]["output"][-1]["name"] == "get"


# --- Anthropic -----------------------------------------------------------------------------------


def test_anthropic_messages_in_the_internal_form() -> None:
    t = translation(
        Endpoint.MESSAGES,
        {
            "model": "m",
            "max_tokens": 50,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AAA"},
                        },
                        {"type": "text", "text": "what?"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "checking"},
                        {"type": "tool_use", "id": "tu1", "name": "look", "input": {"q": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "tu1", "content": "a cat"},
                        {"type": "text", "text": "so?"},
                    ],
                },
            ],
            "tools": [{"name": "look", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
            "stop_sequences": ["END"],
            "top_k": 3,
        },
        False,
    )
    msgs = t.body["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[1]["content"][0]["image_url"]["url"] == "data:image/png;base64,AAA"
    assert (
        msgs[2]["content"] == "checking"
        and msgs[2]["tool_calls"][0]["function"]["arguments"] == '{"q":1}'
    )
    assert msgs[3] == {"role": "tool", "tool_call_id": "tu1", "content": "a cat"}
    assert (
        t.body["tool_choice"] == "required" and t.body["stop"] == ["END"] and t.body["top_k"] == 3
    )
    assert t.body["tools"][0]["function"]["parameters"] == {"type": "object"}


def test_anthropic_answers_unary_and_streamed() -> None:
    msg = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]}
    ex = _exchange(Endpoint.MESSAGES, msg)
    doc = orjson.loads(ex.unary(200, orjson.dumps(CHAT_ANSWER)))
    assert doc["type"] == "message" and doc["stop_reason"] == "tool_use"
    assert doc["content"] == [
        {"type": "text", "text": "Hi there"},
        {"type": "tool_use", "id": "call_x", "name": "get", "input": {"a": 1}},
    ]
    assert doc["usage"] == {"input_tokens": 11, "output_tokens": 4}
    events = _events(_streamed(ex, VLLM_STREAM))
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * len(PIECES),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    texts = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"]
    assert texts == PIECES
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2]["usage"] == {
        "input_tokens": USAGE["prompt_tokens"],
        "output_tokens": USAGE["completion_tokens"],
    }
    tools = _events(_streamed(_exchange(Endpoint.MESSAGES, msg), TOOL_STREAM))
    start = next(e for e in tools if e["type"] == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get"
    parts = [e["delta"]["partial_json"] for e in tools if e["type"] == "content_block_delta"]
    assert orjson.loads("".join(parts)) == {"city": "Paris"}


def test_count_tokens_asks_the_provider_for_one_token_and_reads_the_prompt_usage() -> None:
    ex = _exchange(
        Endpoint.COUNT_TOKENS, {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    )
    assert orjson.loads(ex.body)["max_tokens"] == 1
    assert orjson.loads(ex.unary(200, orjson.dumps(CHAT_ANSWER))) == {"input_tokens": 11}


# --- errors --------------------------------------------------------------------------------------


def test_errors_are_written_in_each_dialects_shape() -> None:
    openai_err = error_body("no such model", "invalid_request_error", "model_not_found")
    assert orjson.loads(error_in_dialect("ollama", 404, openai_err)) == {"error": "no such model"}
    assert orjson.loads(error_in_dialect("anthropic", 404, openai_err)) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no such model"},
    }
    assert (
        orjson.loads(error_in_dialect("anthropic", 503, openai_err))["error"]["type"] == "api_error"
    )
    assert error_in_dialect("responses", 404, openai_err) == openai_err
    native = b'{"type":"error","error":{"type":"invalid_request_error","message":"x"}}'
    assert error_in_dialect("anthropic", 400, native) == native
    assert error_in_dialect("ollama", 400, b'{"error":"x"}') == b'{"error":"x"}'
    assert orjson.loads(error_in_dialect("ollama", 502, b"Bad Gateway")) == {"error": "Bad Gateway"}
    assert orjson.loads(stream_error("ollama", "broke", "upstream_error")) == {"error": "broke"}
    assert (
        _events(stream_error("anthropic", "broke", "upstream_error"))[0]["error"]["message"]
        == "broke"
    )


def test_a_stream_broken_upstream_ends_with_the_dialects_error() -> None:
    ex = _exchange(
        Endpoint.MESSAGES,
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]},
    )
    broken = VLLM_STREAM.split(b"\n\n")[1] + b"\n\n" + b'data: {"error": {"message": "gone"}}\n\n'
    events = _events(_streamed(ex, broken))
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "gone"}}
    assert "message_stop" not in [e["type"] for e in events]


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (
            Endpoint.MESSAGES,
            {"model": "m", "messages": [{"role": "user", "content": "q"}]},
            "max_tokens",
        ),
        (Endpoint.MESSAGES, {"model": "m", "max_tokens": 1, "messages": []}, "messages"),
        (
            Endpoint.OLLAMA_CHAT,
            {"model": "m", "messages": [{"role": "robot", "content": "q"}]},
            "messages",
        ),
        (Endpoint.RESPONSES, {"model": "m"}, "input"),
        (Endpoint.OLLAMA_EMBED, {"model": "m", "input": 3}, "input"),
    ],
)
def test_bad_dialect_requests_are_400_naming_the_field(
    endpoint: Endpoint, body: dict, param: str
) -> None:
    with pytest.raises(RouterError) as info:
        validate_request(endpoint, orjson.dumps(body), "r")
    assert (info.value.status, info.value.param) == (400, param)


def test_malformed_requests_and_answers_are_4xx_and_502_not_500() -> None:
    odd = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "tool_result", "content": [7]}]}],
    }
    with pytest.raises(RouterError) as info:
        _exchange(Endpoint.MESSAGES, odd)
    assert info.value.status == 400 and "malformed anthropic request" in info.value.message
    ex = _exchange(Endpoint.OLLAMA_CHAT, {"model": "m", "messages": [{"role": "user"}]})
    with pytest.raises(RouterError) as info:
        ex.unary(200, b'{"choices": 3}')
    assert (info.value.status, info.value.code) == (502, "bad_upstream_response")


# --- usage read from the client's answers --------------------------------------------------------


def test_counts_are_read_in_each_dialects_shape() -> None:
    assert counts_of("openai", VLLM_CHAT) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert counts_of("ollama", {"done": True, "prompt_eval_count": 3, "eval_count": 2}) == (3, 2)
    assert counts_of("anthropic", {"usage": {"input_tokens": 4, "output_tokens": 1}}) == (4, 1)
    done = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 6, "output_tokens": 2}},
    }
    assert counts_of("responses", done) == (6, 2)
    assert counts_of("openai", {"choices": []}) is None


@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_the_usage_chunk_the_client_did_not_ask_for_is_taken_out(size: int) -> None:
    meter = StreamMeter("openai", strip=True)
    out = b"".join(meter.feed(VLLM_STREAM[i : i + size]) for i in range(0, len(VLLM_STREAM), size))
    out += meter.tail()
    assert meter.counts == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n")
    assert out == VLLM_STREAM.replace(VLLM_STREAM.split(b"\n\n")[-3] + b"\n\n", b"")
    kept = StreamMeter("openai", strip=False)
    assert (
        b"".join(kept.feed(VLLM_STREAM[i : i + size]) for i in range(0, len(VLLM_STREAM), size))
        == VLLM_STREAM
    )
    assert kept.counts == meter.counts


def test_anthropic_and_ollama_streams_are_metered_as_they_pass() -> None:
    ex = _exchange(
        Endpoint.MESSAGES,
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]},
    )
    meter = StreamMeter("anthropic", strip=False)
    meter.feed(_streamed(ex, VLLM_STREAM))
    assert meter.counts == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    ollama_ex = _exchange(
        Endpoint.OLLAMA_CHAT, {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    )
    meter = StreamMeter("ollama", strip=False)
    data = _streamed(ollama_ex, VLLM_STREAM)
    for i in range(0, len(data), 5):
        meter.feed(data[i : i + 5])
    assert meter.counts == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
