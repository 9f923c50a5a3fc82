"""A client that goes away cancels its upstream call, in every dialect, unary and streamed: the
upstream sees the router hang up, and the provider's in-flight count and slot come back (the
provider takes one request at a time, so a leaked count or slot would refuse or hold up the
next request)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, deploy, provider, samples, until

TYPE = "cancel_models"
MODEL = "m/cancel"
# Each dialect's request, as its clients send it (the provider speaks OpenAI: translated).
DIALECTS = {
    "openai": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 4000}]}),
    "ollama": ("/api/chat", {"messages": [{"role": "user", "content": "x" * 4000}]}),
    "responses": ("/v1/responses", {"input": "x" * 4000}),
    "anthropic": (
        "/v1/messages",
        {"max_tokens": 64, "messages": [{"role": "user", "content": "x" * 4000}]},
    ),
}


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> tuple[str, FakeUpstream]:
    up = upstream_factory("cancel")
    config = {
        TYPE: {MODEL: {"providers": [provider("cancel", up.url, max_concurrency=1)]}},
        "active_models": {TYPE: [MODEL]},
        # a slot (a lease from the broker) held for each request, as well as the count
        "routing": {TYPE: {"strategy": "first_available"}},
    }
    deploy(serve_url, config)
    return serve_url, up


async def _in_flight(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics", headers=ADMIN) as resp:
        gauges = samples(await resp.text(), "llm_router_provider_in_flight")
    return gauges.get('llm_router_provider_in_flight{provider="cancel"}', -1.0)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("dialect", list(DIALECTS))
async def test_a_client_that_leaves_cancels_the_upstream_call(
    pool: tuple[str, FakeUpstream], http: aiohttp.ClientSession, dialect: str, stream: bool
) -> None:
    url, up = pool
    path, body = DIALECTS[dialect]
    body = {"model": MODEL, **body, "stream": stream}
    # Unary: held until released. Streamed: ~100 s of events if left alone.
    up.knobs = Knobs(hold=True) if not stream else Knobs(chunks=2000, chunk_delay_s=0.05)
    gone = up.disconnects
    headers = {"content-type": "application/json"}
    try:
        async with aiohttp.ClientSession() as client:  # its own connections, closed on leaving
            call = client.post(f"{url}{path}", data=orjson.dumps(body), headers=headers)
            if stream:
                async with call as resp:
                    assert resp.status == 200
                    await resp.content.readany()  # the stream has begun
            else:
                pending = asyncio.ensure_future(call)

                async def on_the_upstream() -> bool:
                    return up.active == 1

                await until(on_the_upstream, "the call to reach the upstream")
                pending.cancel()

        async def upstream_saw_it() -> bool:
            return up.disconnects == gone + 1 and up.active == 0

        await until(upstream_saw_it, "the upstream to see the router hang up", 30)

        async def count_back() -> bool:
            return await _in_flight(http, url) == 0.0

        await until(count_back, "the provider's in-flight count to come back to 0", 30)
    finally:
        if up.knobs.hold:
            up.release()
        up.knobs = Knobs()
    # the one place is free again: the next call is served, not refused
    async with http.post(
        f"{url}{path}", data=orjson.dumps({**body, "stream": False}), headers=headers
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-router-provider"] == "cancel"
