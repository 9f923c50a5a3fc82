"""Hostile upstreams on real Serve: an answer past its bound (1 GiB unary, an endless SSE or
Ollama line) is a 502 in the client's dialect, the upstream call ends and the ingress replica's
memory stays small; gzip that was not asked for is decoded; answers carry the router's content
type and nosniff; a malformed or cut stream ends with the dialect's error event; a request an
Ollama provider cannot be sent is a 400. Keys are required, so every stream also goes through
the meter that counts a key's tokens (and, for OpenAI, takes out the usage chunk it asked for)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from serve_app.core.schemas import Dialect
from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, deploy, ingress_process, peak_rss, provider, samples, until

pytestmark = pytest.mark.serve

TYPE = "bound_models"
ANSWER_BYTES = 1024 * 1024
EVENT_BYTES = 256 * 1024
GIB = 1 << 30
# What the ingress replica may grow by while an upstream sends it 1 GiB (it holds one bound).
RSS_SLACK = 96 * 1024 * 1024


@dataclass
class Pool:
    url: str
    oa: FakeUpstream  # api_type openai: m/oa
    ol: FakeUpstream  # api_type ollama: m/ol
    vl: FakeUpstream  # api_type vllm (Responses and Messages natively): m/vl
    key: dict[str, str]  # a client key's header


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Iterator[Pool]:
    oa, ol, vl = (upstream_factory(n) for n in ("b-oa", "b-ol", "b-vl"))
    config = {
        TYPE: {
            "m/oa": {"providers": [provider("boa", oa.url, "openai")]},
            "m/ol": {"providers": [provider("bol", ol.url, "ollama")]},
            "m/vl": {"providers": [provider("bvl", vl.url, "vllm")]},
        },
        "active_models": {TYPE: ["m/oa", "m/ol", "m/vl"]},
        "auth": {"require_keys": True},
        "routing": {
            TYPE: {
                "unhealthy_cooldown_s": 0.0,
                "circuit_failures": 1000,
                "max_answer_bytes": ANSWER_BYTES,
                "max_event_bytes": EVENT_BYTES,
            }
        },
    }
    deploy(serve_url, config)
    made = urllib.request.Request(
        f"{serve_url}/api/v1/keys",
        data=orjson.dumps({"name": "bounds"}),
        headers={**ADMIN, "content-type": "application/json"},
    )
    with urllib.request.urlopen(made, timeout=10) as resp:
        key = orjson.loads(resp.read())["key"]
    pool = Pool(serve_url, oa, ol, vl, {"authorization": f"Bearer {key}"})
    yield pool
    for up in (oa, ol, vl):
        up.knobs = Knobs()


PATHS: dict[Dialect, str] = {
    "openai": "/v1/chat/completions",
    "responses": "/v1/responses",
    "anthropic": "/v1/messages",
    "ollama": "/api/chat",
}
# (client dialect, model): each way an answer comes back, passed through or translated.
ROUTES: list[tuple[Dialect, str]] = [
    ("openai", "m/oa"),  # passed through
    ("openai", "m/ol"),  # Ollama NDJSON -> OpenAI SSE
    ("responses", "m/oa"),  # OpenAI SSE -> Responses
    ("responses", "m/vl"),  # passed through
    ("anthropic", "m/oa"),  # OpenAI SSE -> Messages
    ("anthropic", "m/vl"),  # passed through
    ("ollama", "m/oa"),  # OpenAI SSE -> Ollama NDJSON
    ("ollama", "m/ol"),  # passed through
]


def _body(dialect: Dialect, model: str, stream: bool) -> dict[str, Any]:
    if dialect == "responses":
        return {"model": model, "input": "hi", "stream": stream, "store": False}
    doc = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return doc | ({"max_tokens": 30} if dialect == "anthropic" else {})


async def _ask(
    http: aiohttp.ClientSession, pool: Pool, dialect: Dialect, model: str, stream: bool
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    url = pool.url + PATHS[dialect]
    async with http.post(url, json=_body(dialect, model, stream), headers=pool.key) as resp:
        return resp.status, resp.headers, await resp.read()


def _upstream(pool: Pool, model: str) -> FakeUpstream:
    return {"m/oa": pool.oa, "m/ol": pool.ol, "m/vl": pool.vl}[model]


def _a_502(dialect: Dialect, status: int, body: bytes) -> None:
    """A 502 answer in the dialect's error shape."""
    assert status == 502, body[:300]
    doc = orjson.loads(body)
    if dialect == "ollama":
        assert isinstance(doc["error"], str)
    elif dialect == "anthropic":
        assert doc["type"] == "error" and doc["error"]["message"]
    else:
        assert doc["error"]["code"] == "bad_upstream_response"


def _ends_with_error(dialect: Dialect, body: bytes) -> None:
    """A stream's body that ends with the dialect's error event, nothing after."""
    if dialect == "ollama":
        last = body.strip().split(b"\n")[-1]
        assert isinstance(orjson.loads(last)["error"], str), body[-300:]
        return
    events = body.strip().split(b"\n\n")
    if dialect == "openai":
        assert events[-1].startswith(b'data: {"error"') and b"[DONE]" not in body, body[-300:]
    else:
        assert events[-1].startswith(b"event: error\n"), body[-300:]


async def _begun(http: aiohttp.ClientSession, pool: Pool, dialect: Dialect, model: str) -> bytes:
    """A stream whose upstream holds after its first event until the answer has begun (its
    head is here), so that what comes next comes after the first byte: its whole body."""
    up = _upstream(pool, model)
    up.knobs.hold_mid_stream = True
    body = _body(dialect, model, True)
    async with http.post(pool.url + PATHS[dialect], json=body, headers=pool.key) as resp:
        assert resp.status == 200
        up.release()
        return await resp.read()


async def _failed(http: aiohttp.ClientSession, pool: Pool, provider_id: str, reason: str) -> int:
    async with http.get(f"{pool.url}/metrics", headers=ADMIN) as resp:
        text = await resp.text()
    key = f'llm_router_upstream_attempts_total{{outcome="{reason}",provider="{provider_id}"}}'
    return int(samples(text, "llm_router_upstream_attempts_total").get(key, 0))


async def _reported(
    http: aiohttp.ClientSession, pool: Pool, provider_id: str, reason: str, before: int
) -> None:
    async def counted() -> bool:
        return await _failed(http, pool, provider_id, reason) > before

    await until(counted, f"{provider_id}'s failure {reason!r} in the metrics")


async def test_a_1_gib_unary_answer_is_a_502_and_the_replica_stays_small(
    pool: Pool, http: aiohttp.ClientSession
) -> None:
    ingress = ingress_process()
    for dialect, model in (("openai", "m/oa"), ("anthropic", "m/oa"), ("ollama", "m/ol")):
        up = _upstream(pool, model)
        for declared in (False, True):
            up.knobs = Knobs(huge="body", huge_bytes=GIB, huge_declared=declared)
            pid = {"m/oa": "boa", "m/ol": "bol"}[model]
            failed, hung_up = await _failed(http, pool, pid, "answer too large"), up.disconnects
            with peak_rss(ingress) as rss:
                status, _, body = await _ask(http, pool, dialect, model, False)
            assert rss[1] - rss[0] < RSS_SLACK, (dialect, declared, rss)
            _a_502(dialect, status, body)
            await _reported(http, pool, pid, "answer too large", failed)
            await _hung_up(up, hung_up)
    pool.oa.knobs = pool.ol.knobs = Knobs()


async def _hung_up(up: FakeUpstream, before: int) -> None:
    """The router ended the call: the upstream saw it hang up long before it was done."""

    async def seen() -> bool:
        return up.disconnects > before

    await until(seen, "the upstream call to end")


@pytest.mark.parametrize(("dialect", "model"), ROUTES)
async def test_an_endless_stream_line_is_a_502_or_an_error_event_and_the_replica_stays_small(
    pool: Pool, http: aiohttp.ClientSession, dialect: Dialect, model: str
) -> None:
    up = _upstream(pool, model)
    ingress = ingress_process()
    # Endless from the first event: nothing has gone to the client, so a 502.
    up.knobs = Knobs(huge="line", huge_bytes=GIB, bad_at=0)
    with peak_rss(ingress) as rss:
        status, _, body = await _ask(http, pool, dialect, model, True)
    assert rss[1] - rss[0] < RSS_SLACK, rss
    _a_502(dialect, status, body)
    # Endless after two events: the stream under way ends with the dialect's error event.
    up.knobs = Knobs(huge="line", huge_bytes=GIB, bad_at=2)
    hung_up = up.disconnects
    with peak_rss(ingress) as rss:
        body = await _begun(http, pool, dialect, model)
    assert rss[1] - rss[0] < RSS_SLACK, rss
    _ends_with_error(dialect, body)
    await _hung_up(up, hung_up)
    up.knobs = Knobs()


@pytest.mark.parametrize(("dialect", "model"), ROUTES)
async def test_a_malformed_or_cut_stream_ends_with_the_dialects_error_event(
    pool: Pool, http: aiohttp.ClientSession, dialect: Dialect, model: str
) -> None:
    up = _upstream(pool, model)
    ndjson = model == "m/ol"
    for knobs in (
        Knobs(garbage=b"<html>oops</html>\n\n", bad_at=2),  # not SSE / not JSON
        Knobs(garbage=b"[1, 2]\n" if ndjson else b"data: [1, 2]\n\n", bad_at=2),  # not an object
        Knobs(cut=True),  # no terminal event
    ):
        up.knobs = knobs
        _ends_with_error(dialect, await _begun(http, pool, dialect, model))
    up.knobs = Knobs()


@pytest.mark.parametrize(("dialect", "model"), ROUTES)
async def test_gzip_not_asked_for_is_relayed_decoded(
    pool: Pool, http: aiohttp.ClientSession, dialect: Dialect, model: str
) -> None:
    up = _upstream(pool, model)
    up.knobs = Knobs(gzip=True)
    for stream in (False, True):
        status, headers, body = await _ask(http, pool, dialect, model, stream)
        assert status == 200 and "content-encoding" not in headers, body[:300]
        sent = {k.lower(): v for k, v in up.requests[-1].headers.items()}
        assert b"hi" in body and sent["accept-encoding"] == "identity"
        if stream:
            assert body.rstrip().endswith(b"[DONE]" if dialect == "openai" else b"}")
        else:
            orjson.loads(body)
    up.knobs = Knobs()


async def test_answers_carry_the_routers_content_type_and_nosniff(
    pool: Pool, http: aiohttp.ClientSession
) -> None:
    expected = {"openai": "text/event-stream", "ollama": "application/x-ndjson"}
    for dialect, model in (("openai", "m/oa"), ("ollama", "m/ol")):
        up = _upstream(pool, model)
        up.knobs = Knobs(content_type="text/html")
        for stream in (False, True):
            status, headers, _ = await _ask(http, pool, dialect, model, stream)
            kind = expected[dialect] if stream else "application/json"
            assert (status, headers["content-type"].split(";")[0]) == (200, kind)
            assert headers["x-content-type-options"] == "nosniff"
        # An upstream's error that says it is HTML comes back as JSON.
        up.knobs = Knobs(content_type="text/html", fail_status=400)
        status, headers, body = await _ask(http, pool, dialect, model, False)
        assert (status, headers["content-type"]) == (400, "application/json")
        assert orjson.loads(body)["error"]
        up.knobs = Knobs()


async def test_what_an_ollama_provider_cannot_be_sent_is_a_400_in_the_clients_dialect(
    pool: Pool, http: aiohttp.ClientSession
) -> None:
    image = {"type": "image_url", "image_url": "data:image/png;base64,QUJD"}
    before = pool.ol.calls
    for body in (
        {"response_format": {"type": "json"}},
        {"response_format": "json"},
        {"messages": [{"role": "user", "content": [image]}]},
    ):
        doc = {"model": "m/ol", "messages": [{"role": "user", "content": "hi"}]} | body
        async with http.post(f"{pool.url}/v1/chat/completions", json=doc, headers=pool.key) as resp:
            assert resp.status == 400, await resp.text()
            assert (await resp.json())["error"]["code"] == "unsupported_content"
    # A Responses client's text.format of an unknown type, to an Ollama provider.
    doc = {"model": "m/ol", "input": "hi", "text": {"format": {"type": "json"}}}
    async with http.post(f"{pool.url}/v1/responses", json=doc, headers=pool.key) as resp:
        assert resp.status == 400, await resp.text()
    assert pool.ol.calls == before  # none of them reached the upstream
