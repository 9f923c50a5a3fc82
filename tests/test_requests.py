"""Request validation, token estimates and upstream URL roots."""

from __future__ import annotations

import orjson
import pytest

from serve_app.core.config import ProviderConfig
from serve_app.core.errors import RouterError
from serve_app.core.schemas import Endpoint, validate_request
from serve_app.core.tokens import estimate_sequences, estimate_text
from serve_app.upstreams import prepare
from serve_app.upstreams.base import api_root


def test_chat_meta() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "stream": True,
            "messages": [
                {"role": "system", "content": "x" * 40},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "y" * 8},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                    ],
                },
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "temperature": 0.1,
        }
    )
    meta = validate_request(Endpoint.CHAT, body, "rid")
    assert meta.model == "m" and meta.stream and meta.needs_tools and meta.request_id == "rid"
    tools_tokens = (len(orjson.dumps([{"type": "function", "function": {"name": "f"}}])) + 3) // 4
    assert meta.prompt_tokens == (4 + 10) + (4 + 2 + 256) + tools_tokens


def test_embeddings_never_stream_and_count_the_longest_input() -> None:
    body = orjson.dumps({"model": "m", "input": ["a" * 8, "b" * 40], "stream": True})
    meta = validate_request(Endpoint.EMBEDDINGS, body, "r")
    assert not meta.stream and meta.prompt_tokens == 10


def test_token_estimates() -> None:
    assert estimate_text("") == 0 and estimate_text("abcd") == 1 and estimate_text("abcde") == 2
    assert estimate_text("日本語") == 3  # one token per non-ASCII character
    assert estimate_text("ab日本") == 1 + 2
    assert estimate_sequences([1, 2, 3]) == 3
    assert estimate_sequences([[1, 2], [1, 2, 3, 4]]) == 4
    assert estimate_sequences([]) == 0


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"nope", None, "invalid_json"),
        (b'"str"', None, "invalid_json"),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}',
            "model",
            "missing_required_parameter",
        ),
        (
            b'{"model": "", "messages": [{"role": "user", "content": "x"}]}',
            "model",
            "invalid_value",
        ),
        (
            b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}',
            "messages",
            "invalid_value",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            "messages",
            "invalid_value",
        ),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": 1}', "stream", "invalid_value"),
    ],
)
def test_bad_chat_bodies(body: bytes, param: str | None, code: str) -> None:
    with pytest.raises(RouterError) as info:
        validate_request(Endpoint.CHAT, body, "r")
    assert info.value.status == 400
    assert info.value.param == param and info.value.code == code


@pytest.mark.parametrize(
    ("host", "root"),
    [
        ("http://h:7000", "http://h:7000/v1"),
        ("http://h:7000/", "http://h:7000/v1"),
        ("http://h:7000/v1", "http://h:7000/v1"),
        ("http://h:7000/v1/", "http://h:7000/v1"),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai/",
            "https://generativelanguage.googleapis.com/v1beta/openai",
        ),
    ],
)
def test_openai_api_root(host: str, root: str) -> None:
    assert api_root(host, default_path="/v1") == root


def test_numbers_beyond_64_bits_do_not_crash_the_ingress() -> None:
    """Found by schemathesis: orjson cannot encode integers beyond 64 bits."""
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
        b' "tools": [{"x": 1636667394968151392256}]}'
    )
    meta = validate_request(Endpoint.CHAT, body, "r")
    assert meta.prompt_tokens == 4 + 1 + (len('[{"x": 1636667394968151392256}]') + 3) // 4
    # Re-encoding for Ollama works too (orjson reads such a number as a float).
    ollama = ProviderConfig(id="o", api_host="http://127.0.0.1:1", api_type="ollama", input_size=9)
    assert orjson.loads(prepare(ollama, meta, body).body)["tools"] == [
        {"x": float(1636667394968151392256)}
    ]
