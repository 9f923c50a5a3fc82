"""Deaths and flow control across replicas, on real Serve with 2 ingress and 2 picker replicas
per model type (keys required): a picker replica killed while requests wait in its queue and
while an ingress fails over along a slot plan; an ingress replica killed while the other one
streams; and flow control's order (priorities, weights, leavers) across both ingress replicas,
read from the upstream's own record of what reached it."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import random
from collections import Counter
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
import ray
from ray import serve

from serve_app.app import APP_NAME
from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, deploy, provider, samples, until

pytestmark = pytest.mark.serve

FLOW, SLOT, PLAIN = "fail_flow_models", "fail_slot_models", "fail_plain_models"
REPLICAS = 2  # of the ingress and of each picker deployment
DEPLOYMENTS = {"Ingress": REPLICAS, **{f"router-{t}": REPLICAS for t in (FLOW, SLOT, PLAIN)}}
LEASE_S = 2.0
# Serve's HAProxy's stats page (its listing of the ingress replicas it sends to).
HAPROXY_STATS = (
    f"http://127.0.0.1:{os.environ.get('RAY_SERVE_HAPROXY_STATS_PORT', '8404')}/stats;csv"
)
# Bounds for what must end: generous for a busy 2-core machine, never waited out when all is well.
ANSWERED_S = 90.0
RECOVERED_S = 90.0
# How a whole stream ends, in each client dialect.
STREAM_END = {"openai": "data: [DONE]", "anthropic": 'data: {"type":"message_stop"}'}


@dataclass
class Pool:
    url: str
    ups: dict[str, FakeUpstream]
    keys: dict[str, str]  # by role: what each key is made with (KEY_TERMS)


KEY_TERMS = {
    "plain": {},
    "seed": {"priority": 9},
    "leaver": {"priority": 7},
    "high": {"priority": 5},
    "heavy": {"weight": 3},
    "light": {"weight": 1},
}


async def _make_keys(url: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as http:
        keys = {}
        for role, terms in KEY_TERMS.items():
            body = {"name": f"fail-{role}", **terms}
            async with http.post(f"{url}/api/v1/keys", json=body, headers=ADMIN) as resp:
                assert resp.status == 201
                keys[role] = (await resp.json())["key"]
        return keys


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    ups = {n: upstream_factory(f"fail-{n}") for n in ("fc", "s1", "s2", "p1", "p2")}
    ids = {n: up.name for n, up in ups.items()}
    steady = {"unhealthy_cooldown_s": 0, "circuit_failures": 1000, "num_replicas": REPLICAS}
    config = {
        FLOW: {"m/flow": {"providers": [provider(ids["fc"], ups["fc"].url, max_concurrency=1)]}},
        SLOT: {"m/slot": {"providers": [provider(ids[n], ups[n].url) for n in ("s1", "s2")]}},
        PLAIN: {"m/plain": {"providers": [provider(ids[n], ups[n].url) for n in ("p1", "p2")]}},
        "active_models": {FLOW: ["m/flow"], SLOT: ["m/slot"], PLAIN: ["m/plain"]},
        "routing": {
            FLOW: {**steady, "queue_timeout_s": 120},
            SLOT: {**steady, "strategy": "first_available", "lease_s": LEASE_S},
            PLAIN: {**steady, "strategy": "round_robin"},
        },
        "auth": {"require_keys": True},
    }
    deploy(serve_url, config, ingress_replicas=REPLICAS)
    return Pool(serve_url, ups, asyncio.run(_make_keys(serve_url)))


@dataclass
class Answer:
    status: int
    doc: dict
    text: str


async def _ask(
    http: aiohttp.ClientSession,
    pool: Pool,
    model: str,
    label: str,
    role: str = "plain",
    dialect: str = "openai",
    stream: bool = False,
) -> Answer:
    """One request whose message is `label` (the upstream's record names it by that)."""
    headers = {"authorization": f"Bearer {pool.keys[role]}"}
    body: dict = {"model": model, "messages": [{"role": "user", "content": label}]}
    path = "/v1/chat/completions"
    if dialect == "anthropic":
        path, body["max_tokens"] = "/v1/messages", 16
    if stream:
        body["stream"] = True
    async with http.post(pool.url + path, json=body, headers=headers) as resp:
        text = await resp.text()
        doc = orjson.loads(text) if not stream or resp.status != 200 else {}
        return Answer(resp.status, doc, text)


def _label(up: FakeUpstream, index: int) -> str:
    return up.requests[index].body["messages"][0]["content"]


async def _state(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(f"{url}/api/v1/providers/state", headers=ADMIN) as resp:
        assert resp.status == 200
        return await resp.json()


async def _waiting(http: aiohttp.ClientSession, url: str, model: str) -> int:
    """Requests waiting for `model` in every picker replica's queue (pushed each second)."""
    return sum((await _state(http, url))["queues"].get(model, {}).values())


async def _metric(http: aiohttp.ClientSession, pool: Pool, name: str, *providers: str) -> float:
    """A metric's total over `providers` (of this pool), or its unlabelled total."""
    async with http.get(f"{pool.url}/metrics", headers=ADMIN) as resp:
        found = samples(await resp.text(), name)
    names = [f'provider="{pool.ups[p].name}"' for p in providers]
    return sum(v for k, v in found.items() if any(n in k for n in names) or "{" not in k)


async def _in_flight(http: aiohttp.ClientSession, pool: Pool, *providers: str) -> float:
    return await _metric(http, pool, "llm_router_provider_in_flight", *providers)


async def _true(value: bool) -> bool:
    return value


def _replicas(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    )


async def _haproxy_sessions(http: aiohttp.ClientSession) -> dict[str, int]:
    """The connections HAProxy has open to each ingress replica that it sends to (UP)."""
    async with http.get(HAPROXY_STATS) as resp:
        rows = list(csv.DictReader((await resp.text()).lstrip("# ").splitlines()))
    return {
        f"{r['pxname']}/{r['svname']}": int(r["scur"] or 0)
        for r in rows
        if r["svname"] not in ("FRONTEND", "BACKEND") and r["pxname"] != "stats"
        if r["status"] == "UP" and r["bck"] == "0"
    }


async def _all_served(http: aiohttp.ClientSession, pool: Pool, n: int) -> bool:
    """n requests at once, each answered 200 (a connection HAProxy cut counts as not)."""
    try:
        answers = await asyncio.gather(*(_ask(http, pool, "m/plain", "ok") for _ in range(n)))
    except aiohttp.ClientError:
        return False
    return all(a.status == 200 for a in answers)


@pytest.fixture(autouse=True)
async def whole(pool: Pool) -> None:
    """Every test starts with every replica up (a test before may have killed one), served
    through HAProxy, and no booking left (a dead replica's last metrics push has lapsed)."""
    for up in pool.ups.values():
        up.knobs = Knobs()

    async def running() -> bool:
        deployments = serve.status().applications[APP_NAME].deployments
        return all(
            deployments[name].replica_states == {"RUNNING": count} and len(_replicas(name)) == count
            for name, count in DEPLOYMENTS.items()
        )

    await until(running, "every replica running", timeout=RECOVERED_S)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def reached() -> bool:
            return len(await _haproxy_sessions(http)) == REPLICAS

        await until(reached, "HAProxy to send to every ingress replica", timeout=RECOVERED_S)
        await until(lambda: _all_served(http, pool, 8), "every request served", 60)

        async def idle() -> bool:
            return await _in_flight(http, pool, *pool.ups) == 0

        await until(idle, "no booking left", timeout=RECOVERED_S)


async def _heard_of_every_picker(http: aiohttp.ClientSession, pool: Pool) -> None:
    """Requests one at a time, so each ingress replica has lately been answered by both picker
    replicas of m/flow: flow control spreads waiting requests over those it heard of."""
    for n in range(40):
        assert (await _ask(http, pool, "m/flow", f"warm {n}")).status == 200


def _clear_503(answer: Answer, dialect: str) -> bool:
    """A 503 in the client's dialect that says why."""
    if answer.status != 503:
        return False
    if dialect == "anthropic":
        return answer.doc["type"] == "error" and bool(answer.doc["error"]["message"])
    return bool(answer.doc["error"]["message"])


async def _kill_and_wait(name: str) -> None:
    """Kills a replica and returns once Ray has it dead (it can answer nothing more)."""
    ray.kill(ray.get_actor(name, "serve"), no_restart=True)
    deployment = name.split("#")[1]
    await until(lambda: _true(name not in _replicas(deployment)), f"{name} to be dead")


# --- 1. a picker replica dies ----------------------------------------------------------------


async def test_a_picker_replica_dies_while_requests_wait_in_its_queue(pool: Pool) -> None:
    fc = pool.ups["fc"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWERED_S)) as http:
        await _heard_of_every_picker(http, pool)
        fc.knobs = Knobs(hold=True)
        # OpenAI's and Anthropic's dialects, unary and streamed.
        asked = [("anthropic" if n % 3 == 0 else "openai", n % 2 == 1) for n in range(12)]
        clients = [
            asyncio.ensure_future(_ask(http, pool, "m/flow", f"q{n}", dialect=d, stream=s))
            for n, (d, s) in enumerate(asked)
        ]

        async def full() -> bool:  # one held per picker replica (max_concurrency 1), 10 wait
            return fc.active == 2 and await _waiting(http, pool.url, "m/flow") == 10

        await until(full, "both slots taken and 10 requests waiting")
        await _kill_and_wait(random.choice(_replicas(f"router-{FLOW}")))
        fc.release()
        # Every client is answered: those the survivor held or queued, and the one the dead
        # replica had planned (the ingress carries it); those waiting on the dead one get 503.
        _, pending = await asyncio.wait(clients, timeout=ANSWERED_S)
        assert not pending, f"{len(pending)} requests still unanswered"
        answers = [c.result() for c in clients]
        for answer, (dialect, stream) in zip(answers, asked, strict=True):
            if answer.status == 200 and stream:  # whole, to its dialect's last event
                assert answer.text.rstrip().endswith(STREAM_END[dialect]), answer.text
            else:
                assert answer.status == 200 or _clear_503(answer, dialect), answer
        statuses = Counter(a.status for a in answers)
        # Both replicas held waiting requests (flow control spreads them), so some waited on
        # the dead one; at least the two held requests were answered.
        assert statuses[503] >= 1 and statuses[200] >= 2, statuses

        async def given_back() -> bool:
            idle = await _in_flight(http, pool, "fc") == 0
            return idle and await _waiting(http, pool.url, "m/flow") == 0

        await until(given_back, "the bookings and the queue to empty", timeout=RECOVERED_S)
        assert (await _ask(http, pool, "m/flow", "after")).status == 200


async def test_a_picker_replica_dies_while_an_ingress_fails_over_along_its_plan(
    pool: Pool,
) -> None:
    """A slot plan's next provider is asked of the picker that made the plan: dead, the request
    ends in a clear 503 (never hangs), and the slot it held comes back with its lease."""
    s1, s2 = pool.ups["s1"], pool.ups["s2"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWERED_S)) as http:
        s1.knobs = Knobs(hold=True, fail_status=500)  # held, then a 500: fail over
        first = asyncio.ensure_future(_ask(http, pool, "m/slot", "first"))
        holder: list[str] = []

        async def planned() -> bool:
            holder[:] = (await _state(http, pool.url))["holders"].get(s1.name, [])
            return s1.active == 1 and len(holder) == 1

        await until(planned, "the request to hold s1's slot")
        replica = holder[0].split(":", 1)[1]
        await _kill_and_wait(f"SERVE_REPLICA::{APP_NAME}#router-{SLOT}#{replica}")
        s1.release()  # its 500 sends the ingress to the dead picker for the next provider
        answer = await asyncio.wait_for(first, ANSWERED_S)
        # The plan is gone with its picker: a 503 (router_unavailable, or upstream_unavailable
        # naming s1 when the other replica answers that it knows no such plan).
        assert _clear_503(answer, "openai"), answer
        assert s2.count("/v1/chat/completions") == 0

        async def returned() -> bool:
            return not (await _state(http, pool.url))["busy"]

        # Nobody releases s1's slot (its holder is dead): its lease lapses.
        await until(returned, "the dead picker's slot to come back", timeout=RECOVERED_S)
        s1.knobs = Knobs()
        answers = await asyncio.gather(*(_ask(http, pool, "m/slot", "after") for _ in range(2)))
        assert [a.status for a in answers] == [200, 200]


# --- 3. an ingress replica dies ----------------------------------------------------------------


async def test_an_ingress_replica_dies_while_the_other_streams(pool: Pool) -> None:
    p1, p2 = pool.ups["p1"], pool.ups["p2"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWERED_S)) as http:
        expired = await _metric(http, pool, "llm_router_plans_expired_total")
        disconnects = p1.disconnects + p2.disconnects
        for up in (p1, p2):
            up.knobs = Knobs(hold_mid_stream=True, chunks=6)
        # HAProxy's least-connections balance puts held streams on both ingress replicas.
        streams = [
            asyncio.ensure_future(_ask(http, pool, "m/plain", f"s{n}", stream=True))
            for n in range(8)
        ]

        async def held() -> bool:
            return p1.active + p2.active == 8 and await _in_flight(http, pool, "p1", "p2") == 8

        await until(held, "8 streams held mid-answer and booked")
        sessions = await _haproxy_sessions(http)
        assert len(sessions) == REPLICAS and all(sessions.values()), sessions  # on both
        victim = random.choice(_replicas("Ingress"))
        await _kill_and_wait(victim)

        async def cut() -> bool:  # the dead replica's streams: cut at the client and upstream
            ended = sum(s.done() for s in streams)
            return ended >= 1 and p1.disconnects + p2.disconnects - disconnects == ended

        await until(cut, "the dead replica's streams to be cut")
        p1.release()
        p2.release()
        outcomes = await asyncio.gather(*streams, return_exceptions=True)
        whole = [o for o in outcomes if isinstance(o, Answer) and o.status == 200]
        events = (await _ask(http, pool, "m/plain", "reference", stream=True)).text.count("data:")
        for answer in whole:  # every event of a stream never held, no error, the end marker
            assert answer.text.count("data:") == events, answer.text
            assert answer.text.endswith("data: [DONE]\n\n") and '"error"' not in answer.text
        cut_off = len(outcomes) - len(whole)
        assert whole and cut_off, outcomes

        # HAProxy stops sending to the dead replica; once the replacement is up, all is served.
        server = victim.replace("::", "_").replace("#", "-")

        async def dropped() -> bool:
            return not any(name.endswith(f"/{server}") for name in await _haproxy_sessions(http))

        await until(dropped, "HAProxy to stop sending to the dead replica", RECOVERED_S)
        await until(lambda: _all_served(http, pool, 8), "every request served", RECOVERED_S)
        assert await _all_served(http, pool, 16)

        async def given_back() -> bool:
            return await _in_flight(http, pool, "p1", "p2") == 0

        # Nobody reports the dead replica's plans done: the pickers expire them.
        await until(given_back, "the dead replica's bookings to come back", RECOVERED_S)
        assert await _metric(http, pool, "llm_router_plans_expired_total") >= expired + cut_off


# --- 2. flow control across 2 ingress replicas -------------------------------------------------


def _band(label: str) -> int:
    """The priority of the key a label was sent with (its prefix names the key)."""
    return KEY_TERMS[label.split("-")[0]].get("priority", 0)


def _fair(chain: list[str]) -> int:
    """Weights 3:1 inside priority 0 while both keys wait: after every n requests, the heavy
    key's count is within one of 3n/4 (stride scheduling's bound; equal turns break it by n = 6).
    Returns how many requests were checked."""
    lows = [label.split("-")[0] for label in chain if _band(label) == 0]
    last = min(
        max((i for i, k in enumerate(lows) if k == key), default=-1) for key in ("heavy", "light")
    )
    heavy = 0
    for n, key in enumerate(lows[: last + 1], start=1):
        heavy += key == "heavy"
        assert abs(heavy - 0.75 * n) <= 1, (n, lows)
    return last + 1


async def test_flow_control_order_holds_across_two_ingress_replicas(pool: Pool) -> None:
    """Both slots held; seeds, low keys (weights 3:1), a higher priority and leavers queued
    through both ingress replicas onto both picker replicas. Then one slot at a time is freed
    (its client leaves): the picker replica that held it lets its next request go, which
    reaches the upstream next. So the upstream's record, freed slot by freed slot, is each
    picker replica's dispatch order: strict priority, then 3:1, and no leaver ever."""
    fc = pool.ups["fc"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        await _heard_of_every_picker(http, pool)
        fc.knobs = Knobs(hold=True)  # held until their clients leave; never released
        start = len(fc.requests)
        clients: dict[str, asyncio.Future[Answer]] = {}

        def send(role: str, n: int) -> str:
            label = f"{role}-{n}"
            clients[label] = asyncio.ensure_future(_ask(http, pool, "m/flow", label, role))
            return label

        async def queued(count: int) -> None:
            async def seen() -> bool:
                return await _waiting(http, pool.url, "m/flow") == count

            await until(seen, f"{count} requests waiting")

        # Seeds until both slots are taken (a seed that found its replica full waits first).
        for n in range(REPLICAS * 4):
            send("seed", n)

            async def placed(n: int = n) -> bool:
                return fc.active + await _waiting(http, pool.url, "m/flow") == n + 1

            await until(placed, "the seed held or waiting")
            if fc.active == REPLICAS:
                break
        waiting = len(clients) - REPLICAS
        for n in range(24):
            send("heavy", n)
            if n % 3 == 0:
                send("light", n // 3)
        for n in range(6):
            send("high", n)
        leavers = [send("leaver", n) for n in range(4)]
        waiting += 24 + 8 + 6 + 4
        await queued(waiting)
        for label in leavers:
            clients[label].cancel()
        waiting -= len(leavers)
        await queued(waiting)

        # Free one slot at a time; each chain is what one picker replica dispatched.
        assert len(fc.requests) - start == REPLICAS
        chains = [[_label(fc, start + i)] for i in range(REPLICAS)]
        seen = start + REPLICAS
        live = list(range(REPLICAS))  # chains whose replica may still have requests waiting
        while live:
            index = live.pop(0)
            chain = chains[index]
            clients[chain[-1]].cancel()
            others = len(live)  # each other live chain holds its slot

            async def moved(others: int = others, seen: int = seen) -> bool:
                return len(fc.requests) > seen or await _in_flight(http, pool, "fc") == others

            await until(moved, "the freed slot's next request, or its replica's queue empty")
            if len(fc.requests) > seen:
                assert len(fc.requests) == seen + 1, "one freed slot let one request go"
                chain.append(_label(fc, seen))
                seen += 1
                live.append(index)

    arrived = [label for chain in chains for label in chain]
    assert sorted(arrived) == sorted(set(clients) - set(leavers)), "each went once; no leaver"
    checked = []
    for chain in chains:
        bands = [_band(label) for label in chain]
        assert bands == sorted(bands, reverse=True), chain  # strictly by priority
        checked.append(_fair(chain))
    assert max(checked) >= 6, chains  # long enough for equal turns to fail (at n = 6 or 3)
    # Both picker replicas dispatched from the queue (fair share needs both to hold a share).
    assert all(len(chain) > 1 for chain in chains), chains
    for future in clients.values():
        with contextlib.suppress(asyncio.CancelledError):
            await future
