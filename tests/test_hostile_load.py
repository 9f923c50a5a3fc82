"""`make chaos`, hostile section: every hostile client and upstream the router defends against,
sent together with honest traffic at one live router (keys required, loopback Host names only,
one ingress replica) over real upstreams on loopback, counted.

Each attack is answered as it must be (its status, or the dialect's error event closing a stream),
no client fault ever gets a 5xx, every honest request is served, no replica restarts and the
ingress replica's memory grows by less than MEMORY_SLACK. The figures go to `bench/hostile.json`
and stdout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from serve_app.core.door import LOOPBACK_HOSTS
from serve_app.demo.upstream import Knobs
from tests.conftest import (
    JSON_TYPE,
    deploy,
    ingress_process,
    new_key,
    peak_rss,
    provider,
    replica_processes,
)

pytestmark = [pytest.mark.serve, pytest.mark.chaos]

TYPE = "hostile_load"
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "hostile.json"
ROUNDS = 4  # each attack this many times, all of them at once with the honest clients
HONEST = 200  # honest requests sent alongside
MEMORY_SLACK = 160 * 1024 * 1024  # what the ingress replica may grow by, over everything here
ANSWER_BYTES = 4 * 1024 * 1024
EVENT_BYTES = 1024 * 1024
MSG = {"role": "user", "content": "hi"}
SLOW_HEADERS_S = 40.0  # well past HAProxy's request deadline (10 s)


@dataclass
class Target:
    url: str
    key: dict[str, str]  # a client key's header


@pytest.fixture(scope="module")
def target(serve_url: str, upstream_factory) -> Target:
    knobs = {
        "good": Knobs(),
        "huge": Knobs(huge="body"),  # 1 GiB unary answer
        "line": Knobs(huge="line"),  # an endless SSE line
        "gzip": Knobs(gzip=True),
        "junk": Knobs(garbage=b"data: <html>oops</html>\n\n", bad_at=1),
        "cut": Knobs(cut=True),
    }
    models = {}
    for name, k in knobs.items():
        up = upstream_factory(f"hl-{name}")
        up.record, up.knobs = False, k
        models[f"hl/{name}"] = {"providers": [provider(f"hl{name}", up.url)]}
    ollama = upstream_factory("hl-ollama")
    ollama.record = False
    models["hl/ollama"] = {"providers": [provider("hlollama", ollama.url, "ollama")]}
    config = {
        TYPE: models,
        "active_models": {TYPE: list(models)},
        "auth": {"require_keys": True},
        "responses": {"max_background_per_key": 2},
        "routing": {
            TYPE: {
                "circuit_failures": 100_000,  # the hostile upstreams answer on every call
                "unhealthy_cooldown_s": 0.0,
                "max_answer_bytes": ANSWER_BYTES,
                "max_event_bytes": EVENT_BYTES,
            }
        },
    }
    deploy(
        serve_url,
        config,
        max_body_bytes=16 * 1024 * 1024,
        allowed_hosts=LOOPBACK_HOSTS,
        body_timeout_s=3.0,
    )

    async def make_key() -> str:
        async with aiohttp.ClientSession() as http:
            return (await new_key(http, serve_url, name="hl"))["key"]

    return Target(serve_url, {"authorization": f"Bearer {asyncio.run(make_key())}"})


# An outcome: the status, and for a 200 stream whether it ended with an error event.
Outcome = tuple[int, str]
Attack = Callable[[aiohttp.ClientSession, Target], Awaitable[Outcome]]


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    body: bytes | dict,
    headers: dict[str, str],
) -> Outcome:
    data, doc = (body, None) if isinstance(body, bytes) else (None, body)
    async with http.post(url, data=data, json=doc, headers=headers) as resp:
        text = await resp.read()
    streamed = resp.content_type == "text/event-stream"
    last = text.strip().rsplit(b"\n\n", 1)[-1]
    ended = "error-event" if streamed and last.startswith(b'data: {"error"') else "answer"
    return resp.status, ended


def _chat(model: str, stream: bool = False, **extra: object) -> dict:
    return {"model": model, "messages": [MSG], "stream": stream, **extra}


async def huge_body_without_key(http: aiohttp.ClientSession, t: Target) -> Outcome:
    huge = b'{"model": "hl/good", "messages": [' + b",".join([b"{}"] * 4_900_000) + b"]}"
    return await _post(http, f"{t.url}/v1/chat/completions", huge, JSON_TYPE)


async def unknown_model_without_key(http: aiohttp.ClientSession, t: Target) -> Outcome:
    return await _post(http, f"{t.url}/v1/chat/completions", _chat("nope/none"), {})


async def bad_key(http: aiohttp.ClientSession, t: Target) -> Outcome:
    headers = {"authorization": "Bearer sk-sr-0123456789abcdef-" + "A" * 43}
    return await _post(http, f"{t.url}/v1/messages", _chat("hl/good", max_tokens=5), headers)


async def text_plain_post(http: aiohttp.ClientSession, t: Target) -> Outcome:
    body = orjson.dumps(_chat("hl/good"))
    headers = t.key | {"content-type": "text/plain"}
    return await _post(http, f"{t.url}/v1/chat/completions", body, headers)


async def foreign_host(http: aiohttp.ClientSession, t: Target) -> Outcome:
    headers = t.key | {"host": "attacker.example"}
    return await _post(http, f"{t.url}/v1/chat/completions", _chat("hl/good"), headers)


async def too_many_messages(http: aiohttp.ClientSession, t: Target) -> Outcome:
    body = {"model": "hl/good", "messages": [MSG] * 5000}
    return await _post(http, f"{t.url}/v1/chat/completions", body, t.key)


async def broken_json(http: aiohttp.ClientSession, t: Target) -> Outcome:
    headers = t.key | JSON_TYPE
    return await _post(http, f"{t.url}/v1/chat/completions", b'{"model": "hl/good", ', headers)


async def untranslatable_for_ollama(http: aiohttp.ClientSession, t: Target) -> Outcome:
    body = _chat("hl/ollama", response_format="json")
    return await _post(http, f"{t.url}/v1/chat/completions", body, t.key)


async def many_priorities(http: aiohttp.ClientSession, t: Target) -> Outcome:
    headers = t.key | {"x-priority": str(int(time.monotonic_ns() % 100_000))}
    return await _post(http, f"{t.url}/v1/chat/completions", _chat("hl/good"), headers)


async def wrong_admin_token(http: aiohttp.ClientSession, t: Target) -> Outcome:
    headers = {"authorization": "Bearer " + "x" * 40}
    async with http.get(f"{t.url}/api/v1/config", headers=headers) as resp:
        await resp.read()
        return resp.status, "answer"


async def trickled_body(http: aiohttp.ClientSession, t: Target) -> Outcome:
    async def slow() -> object:
        for piece in orjson.dumps(_chat("hl/good")):
            yield bytes([piece])
            await asyncio.sleep(0.25)

    headers = t.key | JSON_TYPE
    async with http.post(f"{t.url}/v1/chat/completions", data=slow(), headers=headers) as resp:
        await resp.read()
        return resp.status, "answer"


async def slow_headers(http: aiohttp.ClientSession, t: Target) -> Outcome:
    """Request headers that never end, a line every 0.2 s: the server closes the connection
    (outcome 0) or answers 408 within SLOW_HEADERS_S; (-1, "still open") if it never does."""
    host, port = t.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    deadline = time.monotonic() + SLOW_HEADERS_S
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(1_000_000):
            if time.monotonic() > deadline:
                return -1, "still open"
            writer.write(f"X-Slow-{i}: a\r\n".encode())
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.read(64), 0.2)
            except TimeoutError:
                continue  # nothing from the server yet
            return (int(line.split()[1]) if line.startswith(b"HTTP/") else 0), "closed"
        return -1, "still open"
    except ConnectionError:
        return 0, "closed"
    finally:
        writer.close()


async def background_flood(http: aiohttp.ClientSession, t: Target) -> Outcome:
    body = {"model": "hl/good", "input": "hi", "background": True}
    return await _post(http, f"{t.url}/v1/responses", body, t.key)


def _upstream(model: str, stream: bool) -> Attack:
    async def attack(http: aiohttp.ClientSession, t: Target) -> Outcome:
        return await _post(http, f"{t.url}/v1/chat/completions", _chat(model, stream), t.key)

    attack.__name__ = f"{model.removeprefix('hl/')}_{'stream' if stream else 'unary'}"
    return attack


# Client faults: (attack, the outcomes it may get). Never a 5xx.
CLIENT: list[tuple[Attack, set[Outcome]]] = [
    (huge_body_without_key, {(401, "answer")}),
    (unknown_model_without_key, {(401, "answer")}),
    (bad_key, {(401, "answer")}),
    (text_plain_post, {(415, "answer")}),
    (foreign_host, {(421, "answer")}),
    (too_many_messages, {(400, "answer")}),
    (broken_json, {(400, "answer")}),
    (untranslatable_for_ollama, {(400, "answer")}),
    (many_priorities, {(200, "answer")}),
    (wrong_admin_token, {(403, "answer"), (429, "answer")}),
    (trickled_body, {(408, "answer")}),
    (slow_headers, {(0, "closed"), (408, "closed")}),
    (background_flood, {(200, "answer"), (429, "answer")}),
]
# Upstream faults: the client gets a 502, or a stream that ends with an error event; gzip that
# was not asked for is decoded.
UPSTREAM: list[tuple[Attack, set[Outcome]]] = [
    (_upstream("hl/huge", False), {(502, "answer")}),
    (_upstream("hl/line", True), {(502, "answer"), (200, "error-event")}),
    (_upstream("hl/gzip", False), {(200, "answer")}),
    (_upstream("hl/gzip", True), {(200, "answer")}),
    # A garbage event read together with the first good one fails the answer before its head.
    (_upstream("hl/junk", True), {(200, "error-event"), (502, "answer")}),
    (_upstream("hl/cut", True), {(200, "error-event")}),
]


async def _honest(http: aiohttp.ClientSession, t: Target, i: int) -> Outcome:
    return await _post(http, f"{t.url}/v1/chat/completions", _chat("hl/good", i % 2 == 1), t.key)


async def test_hostile_clients_and_upstreams_under_load(target: Target) -> None:
    replicas = {title: p.pid for title, p in replica_processes().items()}
    ingress = ingress_process()
    attacks = [
        (kind, a, ok)
        for kind, cases in (("client", CLIENT), ("upstream", UPSTREAM))
        for a, ok in cases
    ]
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout) as http:
        with peak_rss(ingress) as rss:
            jobs = [a(http, target) for _ in range(ROUNDS) for _, a, _ in attacks]
            jobs += [_honest(http, target, i) for i in range(HONEST)]
            outcomes = await asyncio.gather(*jobs)
    elapsed = time.monotonic() - started
    by_attack: dict[str, Counter[str]] = {}
    wrong: list[str] = []
    for i, (kind, attack, ok) in enumerate(a for _ in range(ROUNDS) for a in attacks):
        got = outcomes[i]
        by_attack.setdefault(f"{kind}:{attack.__name__}", Counter())[f"{got[0]} {got[1]}"] += 1
        if got not in ok:
            wrong.append(f"{attack.__name__}: {got}, expected one of {sorted(ok)}")
    honest = Counter(status for status, _ in outcomes[len(attacks) * ROUNDS :])
    client_5xx = sum(
        n
        for name, seen in by_attack.items()
        if name.startswith("client:")
        for outcome, n in seen.items()
        if outcome[0] == "5"
    )
    after = {title: p.pid for title, p in replica_processes().items()}
    report = {
        "attacks_tried": len(attacks) * ROUNDS,
        "honest_requests": HONEST,
        "honest_by_status": {str(s): n for s, n in sorted(honest.items())},
        "client_fault_5xx": client_5xx,
        "replica_restarts": sum(1 for t, pid in replicas.items() if after.get(t) != pid),
        "ingress_rss_growth_mib": round((rss[1] - rss[0]) / 2**20, 1),
        "elapsed_s": round(elapsed, 1),
        "outcomes": {name: dict(seen) for name, seen in sorted(by_attack.items())},
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("\nhostile:", json.dumps(report, indent=2))
    assert not wrong, wrong
    assert client_5xx == 0
    assert honest == {200: HONEST}, honest
    assert report["replica_restarts"] == 0, (replicas, after)
    assert rss[1] - rss[0] < MEMORY_SLACK, report["ingress_rss_growth_mib"]
