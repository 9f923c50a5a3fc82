"""What a key is charged and what it may take, on real Serve with keys required: `max_tokens`
reserved against a TPM limit by requests in flight together, a stream cut by its client
charged what it relayed, background responses bounded per replica and per key, priority
labels in bounded number, and a fallback model only for keys allowed to use it."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import ADMIN, deploy, free_port, new_key, provider, samples, until
from tests.test_flow_serve import _true
from tests.test_keys import _in_one_minute

pytestmark = pytest.mark.serve

TYPE, FLOW = "account_models", "account_flow"
# The demo answers "<name>: <text>" in `chunks` pieces and counts one completion token a
# piece: 40 pieces of one character here (a 5-token prompt, 40 completion tokens).
SHORT = "x" * 34  # "acct: " + 34 characters
LONG = "y" * 155  # "cut: " + 155 characters: 40 pieces of 4 (one token each, by estimate)


@dataclass
class Pool:
    url: str
    acct: FakeUpstream
    cut: FakeUpstream
    bg: FakeUpstream
    fb: FakeUpstream
    tight: FakeUpstream


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    acct, cut, bg = upstream_factory("acct"), upstream_factory("cut"), upstream_factory("bg")
    fb, tight = upstream_factory("fb"), upstream_factory("tight")
    acct.knobs.chunks = cut.knobs.chunks = 40
    acct.knobs.latency_s = 0.5  # answers in flight together
    cut.knobs.chunk_delay_s = 0.1  # 4 s a stream: a late look at the client costs little
    dead = f"http://127.0.0.1:{free_port()}"
    config = {
        TYPE: {
            "m/a": {"providers": [provider("acct", acct.url)]},
            "m/cut": {"providers": [provider("cut", cut.url)]},
            "m/bg": {"providers": [provider("bg", bg.url)]},
            "m/fb": {"providers": [provider("fb", fb.url)]},
            "m/dead": {"providers": [provider("dead", dead)], "fallback_model": "m/fb"},
        },
        FLOW: {"m/tight": {"providers": [provider("tight", tight.url, max_concurrency=1)]}},
        "active_models": {TYPE: ["m/a", "m/cut", "m/bg", "m/fb", "m/dead"], FLOW: ["m/tight"]},
        "routing": {TYPE: {"unhealthy_cooldown_s": 0}, FLOW: {"queue_timeout_s": 60}},
        "responses": {"max_background": 2, "max_background_per_key": 1},
        "auth": {"require_keys": True},
    }
    deploy(serve_url, config)
    return Pool(serve_url, acct, cut, bg, fb, tight)


def _auth(made: dict) -> dict[str, str]:
    return {"authorization": f"Bearer {made['key']}"}


async def _usage(http: aiohttp.ClientSession, url: str, made: dict, model: str) -> dict:
    async with http.get(f"{url}/api/v1/keys/{made['id']}", headers=ADMIN) as resp:
        return (await resp.json())["usage"]["models"].get(model, {})


async def test_requests_in_flight_together_cannot_overrun_a_tpm_limit(pool: Pool, http) -> None:
    made = await new_key(http, pool.url, tpm_limit=300)
    body = {"model": "m/a", "max_tokens": 40, "messages": [{"role": "user", "content": SHORT}]}

    async def chat() -> tuple[int, dict, CIMultiDict[str]]:
        async with http.post(
            f"{pool.url}/v1/chat/completions", json=body, headers=_auth(made)
        ) as resp:
            return resp.status, await resp.json(), resp.headers.copy()

    await _in_one_minute(15)
    answers = await asyncio.gather(*(chat() for _ in range(12)))
    served = [doc["usage"]["total_tokens"] for status, doc, _ in answers if status == 200]
    refused = [(doc, headers) for status, doc, headers in answers if status == 429]
    assert len(served) + len(refused) == len(answers), [a[0] for a in answers]
    # Each counted for its prompt and its 40 tokens at once: together they stay under 300.
    assert served and sum(served) <= 300, served
    assert refused
    for doc, headers in refused:
        assert doc["error"]["code"] == "rate_limit_exceeded", doc
        assert headers["x-ratelimit-limit-tokens"] == "300" and int(headers["retry-after"]) > 0
    # Anthropic's clients get the refusal in Anthropic's shape.
    message = {"model": "m/a", "max_tokens": 40, "messages": [{"role": "user", "content": "q"}]}
    async with http.post(f"{pool.url}/v1/messages", json=message, headers=_auth(made)) as resp:
        doc = await resp.json()
        assert resp.status == 429 and doc["type"] == "error", doc
        assert doc["error"]["type"] == "rate_limit_error"
        assert resp.headers["x-ratelimit-limit-tokens"] == "300"


async def test_a_stream_cut_by_its_client_is_charged_what_it_relayed(pool: Pool, http) -> None:
    made = await new_key(http, pool.url)
    body = {"model": "m/cut", "stream": True, "messages": [{"role": "user", "content": LONG}]}

    async def stream(keep: int) -> int:
        """Reads until `keep` characters of the answer came, then leaves; what it read."""
        text = ""
        async with http.post(
            f"{pool.url}/v1/chat/completions", json=body, headers=_auth(made)
        ) as resp:
            assert resp.status == 200
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        choices = orjson.loads(event[6:])["choices"]
                        text += "".join(c["delta"].get("content") or "" for c in choices)
                if len(text) >= keep:
                    resp.close()  # the client goes
                    break
        return len(text)

    assert await stream(10_000) == 160  # whole: the upstream's usage counts 40

    async def charged(requests: int) -> bool:
        return (await _usage(http, pool.url, made, "m/cut")).get("requests") == requests

    await until(lambda: charged(1), "the whole stream's usage")
    assert (await _usage(http, pool.url, made, "m/cut"))["completion"] == 40
    assert await stream(80) < 160  # left at half
    await until(lambda: charged(2), "the cut stream's usage")
    usage = await _usage(http, pool.url, made, "m/cut")
    half = usage["completion"] - 40
    assert 14 <= half <= 30, usage  # about 20: what went out before the client left
    assert usage["estimated_requests"] == 1
    # Cut by its deadline (2 s of a 4 s stream): charged what went out before it, too.
    async with http.post(
        f"{pool.url}/v1/chat/completions",
        json=body,
        headers=_auth(made) | {"x-request-timeout": "2"},
    ) as resp:
        assert resp.status == 200 and b"deadline_exceeded" in await resp.read()
    await until(lambda: charged(3), "the stream cut by its deadline's usage")
    late = (await _usage(http, pool.url, made, "m/cut"))["completion"] - 40 - half
    assert 8 <= late <= 30, late


async def test_background_responses_past_their_bounds_are_429(pool: Pool, http) -> None:
    pool.bg.knobs.hold = True  # every background run stays running
    keys = [await new_key(http, pool.url) for _ in range(3)]

    async def background(made: dict) -> tuple[int, dict, CIMultiDict[str]]:
        body = {"model": "m/bg", "input": "later", "background": True}
        async with http.post(f"{pool.url}/v1/responses", json=body, headers=_auth(made)) as resp:
            return resp.status, await resp.json(), resp.headers.copy()

    try:
        first = await background(keys[0])
        assert first[0] == 200 and first[1]["status"] == "queued", first
        status, doc, headers = await background(keys[0])  # the key's bound: 1
        assert status == 429 and doc["error"]["code"] == "too_many_background_responses", doc
        assert headers["retry-after"] == "1"
        assert (await background(keys[1]))[0] == 200
        status, doc, _ = await background(keys[2])  # the replica's bound: 2
        assert status == 429 and doc["error"]["code"] == "too_many_background_responses", doc
    finally:
        pool.bg.release()

    async def ended() -> bool:
        url = f"{pool.url}/v1/responses/{first[1]['id']}"
        async with http.get(url, headers=_auth(keys[0])) as resp:
            return (await resp.json())["status"] == "completed"

    async def room() -> bool:
        return (await background(keys[0]))[0] == 200

    await until(ended, "the first background response to end")
    await until(room, "room for the key's next background response")


async def test_priority_labels_are_a_few_ranges_however_many_priorities(pool: Pool, http) -> None:
    made = await new_key(http, pool.url, set_priority=True, max_priority=1000)
    pool.tight.knobs.hold = True  # the one slot stays taken: the rest wait in the queue

    async def chat(priority: int) -> int:
        body = {"model": "m/tight", "messages": [{"role": "user", "content": "q"}]}
        headers = _auth(made) | {"x-priority": str(priority)}
        async with http.post(f"{pool.url}/v1/chat/completions", json=body, headers=headers) as r:
            return r.status

    holder = asyncio.ensure_future(chat(0))
    await until(lambda: _true(pool.tight.count("/v1/chat/completions") >= 1), "the slot taken")
    priorities = [p * sign for p in range(1, 1000, 53) for sign in (1, -1)]  # 38 values
    waiting = [asyncio.ensure_future(chat(p)) for p in priorities]

    async def queued() -> bool:
        async with http.get(f"{pool.url}/api/v1/providers/state", headers=ADMIN) as resp:
            return sum((await resp.json())["queues"].get("m/tight", {}).values()) == len(waiting)

    await until(queued, "every request waiting")
    pool.tight.release()
    assert set(await asyncio.gather(holder, *waiting)) == {200}

    labels: set[str] = set()

    async def counted() -> bool:
        """Every wait is in /metrics (`labels`: their priority labels)."""
        async with http.get(f"{pool.url}/metrics", headers=ADMIN) as resp:
            page = await resp.text()
        seen = samples(page, "llm_router_queue_wait_seconds_count")
        tight = {k: v for k, v in seen.items() if 'model="m/tight"' in k}
        labels.clear()
        labels.update(re.findall(r'priority="([^"]*)"', "".join(tight)))
        return sum(tight.values()) >= len(waiting)

    await until(counted, "the waits in /metrics")
    assert labels == {"1..9", "10..99", "100..1000", "-9..-1", "-99..-10", "-1000..-100"}


async def test_a_fallback_model_serves_only_keys_allowed_to_use_it(pool: Pool, http) -> None:
    body = {"model": "m/dead", "messages": [{"role": "user", "content": "q"}]}
    before = pool.fb.count("/v1/chat/completions")
    narrow = await new_key(http, pool.url, models=["m/dead"])
    async with http.post(f"{pool.url}/v1/chat/completions", json=body, headers=_auth(narrow)) as r:
        doc = await r.json()
        assert r.status == 503 and "x-router-fallback-model" not in r.headers, doc
    assert pool.fb.count("/v1/chat/completions") == before
    wide = await new_key(http, pool.url, models=["m/dead", "m/fb"])
    async with http.post(f"{pool.url}/v1/chat/completions", json=body, headers=_auth(wide)) as r:
        assert r.status == 200 and r.headers["x-router-fallback-model"] == "m/fb"
    assert pool.fb.count("/v1/chat/completions") == before + 1
