"""The ingress's front door on real Serve, over loopback through Serve's HAProxy: with keys
required nothing is read or parsed before the key is checked, and a missing or bad key is
answered alike whatever model the body names; what a body may hold; JSON bodies only; a Host
that is not a loopback name refused (the app as `serve-router run` makes it on loopback); a
trickled body cut; `/metrics` behind the admin token. Every refusal in the request's dialect."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from serve_app.core.door import LOOPBACK_HOSTS
from serve_app.core.schemas import BodyLimits
from tests.conftest import ADMIN, JSON_TYPE, deploy, new_key, provider, samples

pytestmark = pytest.mark.serve

TYPE = "front_models"
MODEL = "f/a"
MSG = {"role": "user", "content": "hi"}
# dialect -> a path and a body (without its model) that the model serves.
DIALECTS = {
    "openai": ("/v1/chat/completions", {"messages": [MSG]}),
    "responses": ("/v1/responses", {"input": "hi"}),
    "anthropic": ("/v1/messages", {"max_tokens": 5, "messages": [MSG]}),
    "ollama": ("/api/chat", {"stream": False, "messages": [MSG]}),
}
PARSED = "llm_router_request_bodies_parsed_total"
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def url(serve_url: str, upstream_factory) -> str:
    up = upstream_factory("front")
    config = {
        TYPE: {MODEL: {"providers": [provider("fr", up.url)]}},
        "active_models": {TYPE: [MODEL]},
        "auth": {"require_keys": True},
    }
    deploy(
        serve_url,
        config,
        max_body_bytes=16 * 1024 * 1024,
        body_timeout_s=BODY_TIMEOUT_S,
        body_limits=BodyLimits(max_messages=4, max_content_parts=2, max_tools=2),
        allowed_hosts=LOOPBACK_HOSTS,
    )
    return serve_url


@pytest.fixture(scope="module")
def key(url: str) -> str:
    async def make() -> str:
        async with aiohttp.ClientSession() as http:
            return (await new_key(http, url, name="front"))["key"]

    return asyncio.run(make())


def assert_dialect_error(dialect: str, doc: object) -> None:
    """`doc` is an error in `dialect`'s own shape."""
    assert isinstance(doc, dict), doc
    if dialect == "ollama":
        assert list(doc) == ["error"] and isinstance(doc["error"], str), doc
    elif dialect == "anthropic":
        assert doc["type"] == "error" and isinstance(doc["error"]["type"], str), doc
    else:
        assert isinstance(doc["error"]["message"], str) and doc["error"]["code"], doc


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes | dict, headers: dict[str, str]
) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else None
    doc = None if isinstance(body, bytes) else body
    async with http.post(url, data=data, json=doc, headers=headers) as resp:
        return resp.status, await resp.read()


async def _parsed(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Bodies parsed so far, by dialect (one ingress replica: its own totals are current)."""
    async with http.get(f"{url}/metrics", headers=ADMIN) as resp:
        assert resp.status == 200
        found = samples(await resp.text(), PARSED)
    return {d: found.get(f'{PARSED}{{api="{d}"}}', 0.0) for d in DIALECTS}


async def test_without_a_valid_key_nothing_is_read_or_parsed(url: str, key: str, http) -> None:
    before = await _parsed(http, url)
    # 14 MiB of empty messages: parsing it would cost the replica seconds of CPU.
    huge = b'{"model": "f/a", "messages": [' + b",".join([b"{}"] * 4_900_000) + b"]}"
    assert len(huge) > 14 * 1024 * 1024
    bad = "Bearer sk-sr-0123456789abcdef-" + "A" * 43
    for headers in ({}, {"authorization": bad}):
        status, answer = await _post(http, f"{url}/v1/chat/completions", huge, JSON_TYPE | headers)
        assert status == 401, answer[:300]
    for dialect, (path, body) in DIALECTS.items():
        status, _ = await _post(http, url + path, {"model": MODEL, **body}, {})
        assert status == 401, dialect
    # The one request with a key is parsed: the counter moves by exactly that one.
    headers = {"authorization": f"Bearer {key}"}
    status, _ = await _post(
        http, f"{url}/v1/chat/completions", {"model": MODEL, "messages": [MSG]}, headers
    )
    assert status == 200
    assert await _parsed(http, url) == before | {"openai": before["openai"] + 1}


async def test_a_missing_or_bad_key_is_answered_alike_for_any_model(url: str, http) -> None:
    for dialect, (path, body) in DIALECTS.items():
        for headers in (
            {},
            {"authorization": "Bearer nope"},
            {"authorization": "Basic abc"},
            {"authorization": "Bearer sk-sr-0123456789abcdef-" + "A" * 43},
            {"x-api-key": "nope"},
        ):
            known = await _post(http, url + path, {"model": MODEL, **body}, headers)
            unknown = await _post(http, url + path, {"model": "no/such-model", **body}, headers)
            assert known == unknown and known[0] == 401, (dialect, headers, known, unknown)
            assert_dialect_error(dialect, orjson.loads(known[1]))


async def test_what_a_body_holds_is_bounded_in_its_dialect(url: str, key: str, http) -> None:
    headers = {"authorization": f"Bearer {key}"}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}] * 3
    for dialect, (path, body) in DIALECTS.items():
        many = {"input": [MSG] * 5} if dialect == "responses" else {"messages": [MSG] * 5}
        for over in (many, {"tools": tools}):
            status, answer = await _post(
                http, url + path, {"model": MODEL, **body, **over}, headers
            )
            doc = orjson.loads(answer)
            assert status == 400, (dialect, over, doc)
            assert_dialect_error(dialect, doc)
            if dialect in ("openai", "responses"):
                assert doc["error"]["code"] == "array_above_max_length"
        status, _ = await _post(http, url + path, {"model": MODEL, **body}, headers)
        assert status == 200, dialect


async def test_only_json_bodies_are_taken(url: str, key: str, http) -> None:
    """What a cross-site form or a typeless fetch can send without a preflight is refused."""
    auth = {"authorization": f"Bearer {key}"}
    for dialect, (path, body) in DIALECTS.items():
        raw = orjson.dumps({"model": MODEL, **body})
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = auth if kind is None else auth | {"content-type": kind}
            skip = ["Content-Type"] if kind is None else []
            async with http.post(
                url + path, data=raw, headers=headers, skip_auto_headers=skip
            ) as resp:
                doc = await resp.json(content_type=None)
                assert resp.status == 415, (dialect, kind, doc)
                assert_dialect_error(dialect, doc)
        status, _ = await _post(http, url + path, raw, auth | JSON_TYPE)
        assert status == 200, dialect
    form = {"content-type": "application/x-www-form-urlencoded"}
    status, _ = await _post(http, f"{url}/api/v1/keys", b'{"name": "form"}', ADMIN | form)
    assert status == 415
    async with http.get(f"{url}/api/v1/keys", headers=ADMIN) as resp:
        assert "form" not in [k["name"] for k in (await resp.json())["data"]]
    # A POST without a body (a cancel) needs no type: it reaches its route.
    async with http.post(
        f"{url}/v1/responses/resp_nothing/cancel", headers=auth, skip_auto_headers=["Content-Type"]
    ) as resp:
        assert resp.status == 404


async def test_a_host_that_is_not_loopback_is_refused(url: str, key: str, http) -> None:
    """DNS rebinding: a page served from evil.example, its name rebound to 127.0.0.1."""
    port = urlsplit(url).port
    auth = {"authorization": f"Bearer {key}"}
    for dialect, (path, body) in DIALECTS.items():
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}"):
            status, answer = await _post(
                http, url + path, {"model": MODEL, **body}, auth | {"host": host}
            )
            assert status == 421, (dialect, host, answer)
            assert_dialect_error(dialect, orjson.loads(answer))
        for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
            status, _ = await _post(
                http, url + path, {"model": MODEL, **body}, auth | {"host": host}
            )
            assert status == 200, (dialect, host)
    async with http.get(f"{url}/v1/models", headers=auth | {"host": "evil.example"}) as resp:
        assert resp.status == 421
        assert resp.headers["x-content-type-options"] == "nosniff"
    async with http.get(f"{url}/v1/models", headers=auth) as resp:  # FastAPI's own routes too
        assert resp.status == 200
        assert resp.headers["x-content-type-options"] == "nosniff"


async def test_a_trickled_body_is_cut(url: str, key: str) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    size = 200  # a byte every 0.25 s: 50 s for the whole body, far past the deadline

    async def trickle() -> None:
        for _ in range(size):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.25)

    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Length: " + str(size).encode() + b"\r\n\r\n"
    )
    sending = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(4096), 40)
        trickling = not sending.done()  # answered while the body was still coming
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()
    assert trickling
    assert answer.split(b" ", 2)[1] == b"408", answer[:200]
    assert b"request_timeout" in answer


async def test_metrics_need_the_admin_token(url: str, key: str, http) -> None:
    for headers, status in (
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 403),
        ({"authorization": f"Bearer {key}"}, 403),  # a client key is not the admin token
        (ADMIN, 200),
    ):
        async with http.get(f"{url}/metrics", headers=headers) as resp:
            text = await resp.text()
            assert resp.status == status, text
            assert (MODEL in text) == (status == 200)
