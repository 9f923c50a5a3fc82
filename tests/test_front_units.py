"""The front door's pure parts: the Host and Content-Type checks, what a body may hold in every
dialect, the token estimate's cost, and `serve-router run` passing the Host check to the app."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from serve_app.cli.main import parser
from serve_app.cli.run import app_args
from serve_app.core.door import LOOPBACK_HOSTS, content_type_refusal, host_refusal, is_loopback
from serve_app.core.errors import RouterError
from serve_app.core.schemas import BodyLimits, Endpoint, validate_request
from serve_app.core.tokens import estimate_text

LIMITS = BodyLimits(max_messages=3, max_content_parts=2, max_tools=1)
MSG = {"role": "user", "content": "x"}
PARTS = [{"type": "text", "text": "a"}] * 3
TOOLS = [{"type": "function", "function": {"name": "f"}}] * 2


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:8000", "[::1]", "[::1]:8000", "::1"],
)
def test_loopback_names_pass_with_any_port(host: str) -> None:
    assert host_refusal(host, LOOPBACK_HOSTS) is None


@pytest.mark.parametrize(
    "host", [None, "", "evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80"]
)
def test_other_hosts_are_refused_when_a_list_is_set(host: str | None) -> None:
    err = host_refusal(host, LOOPBACK_HOSTS)
    assert err is not None and err.status == 421 and err.code == "host_not_allowed"
    assert host_refusal(host, None) is None  # no list: no check


def test_listening_addresses_that_reach_only_this_machine() -> None:
    assert all(is_loopback(a) for a in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(a) for a in ("0.0.0.0", "", "::", "10.0.0.5", "router.local"))


@pytest.mark.parametrize(
    ("method", "content_type", "has_body", "refused"),
    [
        ("POST", "application/json", True, False),
        ("POST", "Application/JSON; charset=utf-8", True, False),
        ("PUT", "application/json", True, False),
        ("POST", "text/plain", True, True),  # a cross-site form's types need no preflight
        ("POST", "application/x-www-form-urlencoded", True, True),
        ("POST", "multipart/form-data; boundary=x", True, True),
        ("PATCH", "text/plain;charset=UTF-8", True, True),
        ("POST", None, True, True),  # a fetch of a typeless Blob
        ("POST", "application/jsonx", True, True),
        ("POST", None, False, False),  # no body (a cancel): nothing to type
        ("GET", "text/plain", True, False),
        ("DELETE", None, True, False),
    ],
)
def test_a_body_must_be_typed_json(
    method: str, content_type: str | None, has_body: bool, refused: bool
) -> None:
    err = content_type_refusal(method, content_type, has_body)
    assert (err is not None) == refused
    if err is not None:
        assert err.status == 415 and err.code == "unsupported_media_type"


def _refused(endpoint: Endpoint, doc: dict) -> RouterError:
    with pytest.raises(RouterError) as info:
        validate_request(endpoint, orjson.dumps(doc), "r", LIMITS)
    assert info.value.status == 400 and info.value.code == "array_above_max_length"
    return info.value


@pytest.mark.parametrize(
    ("endpoint", "within", "over", "param"),
    [
        (Endpoint.CHAT, {"messages": [MSG] * 3}, {"messages": [MSG] * 4}, "messages"),
        (
            Endpoint.CHAT,
            {"messages": [{"role": "user", "content": PARTS[:2]}]},
            {"messages": [{"role": "user", "content": PARTS}]},
            "content",
        ),
        (
            Endpoint.CHAT,
            {"messages": [MSG], "tools": TOOLS[:1]},
            {"messages": [MSG], "tools": TOOLS},
            "tools",
        ),
        (
            Endpoint.CHAT,
            {"messages": [MSG], "functions": [{"name": "f"}]},
            {"messages": [MSG], "functions": [{"name": "f"}] * 2},
            "tools",
        ),
        (Endpoint.OLLAMA_CHAT, {"messages": [MSG] * 3}, {"messages": [MSG] * 4}, "messages"),
        (
            Endpoint.OLLAMA_CHAT,
            {"messages": [{**MSG, "images": ["i", "j"]}]},
            {"messages": [{**MSG, "images": ["i", "j", "k"]}]},
            "content",
        ),
        (
            Endpoint.OLLAMA_CHAT,
            {"messages": [MSG], "tools": TOOLS[:1]},
            {"messages": [MSG], "tools": TOOLS},
            "tools",
        ),
        (Endpoint.RESPONSES, {"input": [MSG] * 3}, {"input": [MSG] * 4}, "messages"),
        (
            Endpoint.RESPONSES,
            {"input": [{"role": "user", "content": PARTS[:2]}]},
            {"input": [{"role": "user", "content": PARTS}]},
            "content",
        ),
        (
            Endpoint.RESPONSES,
            {"input": "x", "tools": TOOLS[:1]},
            {"input": "x", "tools": TOOLS},
            "tools",
        ),
        (Endpoint.MESSAGES, {"messages": [MSG] * 3}, {"messages": [MSG] * 4}, "messages"),
        (
            Endpoint.MESSAGES,
            {"messages": [MSG], "system": PARTS[:2]},
            {"messages": [MSG], "system": PARTS},
            "content",
        ),
        (
            Endpoint.COUNT_TOKENS,
            {"messages": [{"role": "user", "content": PARTS[:2]}]},
            {"messages": [{"role": "user", "content": PARTS}]},
            "content",
        ),
        (
            Endpoint.MESSAGES,
            {"messages": [MSG], "tools": TOOLS[:1]},
            {"messages": [MSG], "tools": TOOLS},
            "tools",
        ),
    ],
)
def test_what_a_body_holds_is_bounded_in_every_dialect(
    endpoint: Endpoint, within: dict, over: dict, param: str
) -> None:
    base = {"model": "m", "max_tokens": 5}
    assert validate_request(endpoint, orjson.dumps(base | within), "r", LIMITS).model == "m"
    assert _refused(endpoint, base | over).param == param


def test_the_default_limits_are_far_above_real_requests() -> None:
    doc = {"model": "m", "messages": [MSG] * 1000, "tools": TOOLS * 50}
    assert validate_request(Endpoint.CHAT, orjson.dumps(doc), "r").prompt_tokens > 0


class _NoLoop(str):
    """A string that fails if the estimate walks it one character at a time in Python."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("iterated per character")


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("abcd", 1), ("ab日本", 1 + 2), ("日本語", 3), ("é" * 9 + "abcde", 9 + 2), ("😀a", 1 + 1)],
)
def test_the_estimate_counts_non_ascii_without_a_python_loop(text: str, tokens: int) -> None:
    assert estimate_text(_NoLoop(text)) == tokens


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ([], LOOPBACK_HOSTS),  # the default, 127.0.0.1
        (["--host", "localhost"], LOOPBACK_HOSTS),
        (["--host", "::1"], LOOPBACK_HOSTS),
        (["--host", "0.0.0.0"], None),
        (["--host", "10.1.2.3"], None),
    ],
)
def test_run_on_loopback_checks_the_host(host: list[str], allowed: tuple[str, ...] | None) -> None:
    assert app_args(parser().parse_args(["run", *host])).allowed_hosts == allowed
