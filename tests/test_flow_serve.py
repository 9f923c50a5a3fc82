"""Flow control on real Serve (2 picker replicas, keys required): demo upstreams of 2 slots
each (max_concurrency), a key that floods and one that asks now and then, weights, priorities;
a model whose queue times out, loses a client that left, and sheds."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import pytest
from multidict import CIMultiDict

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import ADMIN, deploy, provider, samples, until

pytestmark = pytest.mark.serve

TYPE, TIGHT, FAIR = "flowing_models", "tight_models", "fair_models"
CHAT = [{"role": "user", "content": "q"}]


@dataclass
class Pool:
    url: str
    ups: list[FakeUpstream]
    tight: FakeUpstream
    fair: FakeUpstream


async def _key(http: aiohttp.ClientSession, url: str, **terms: object) -> str:
    body = {"name": f"f-{time.monotonic_ns()}", **terms}
    async with http.post(f"{url}/api/v1/keys", json=body, headers=ADMIN) as resp:
        assert resp.status == 201
        return (await resp.json())["key"]


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    ups = [upstream_factory(f"flow-{n}") for n in range(2)]
    for up in ups:
        up.knobs.latency_s = 0.05  # one answer's time
    tight = upstream_factory("flow-tight")
    tight.knobs.hold = True
    fair = upstream_factory("flow-fair")  # one slot, one picker replica: grants in a line
    fair.knobs.latency_s = 0.02
    config = {
        TYPE: {
            "m/busy": {
                "providers": [provider(u.name, u.url, max_concurrency=2) for u in ups],
            }
        },
        TIGHT: {"m/tight": {"providers": [provider("tight", tight.url, max_concurrency=1)]}},
        FAIR: {"m/fair": {"providers": [provider("fair", fair.url, max_concurrency=1)]}},
        "active_models": {TYPE: ["m/busy"], TIGHT: ["m/tight"], FAIR: ["m/fair"]},
        "routing": {
            TYPE: {"num_replicas": 2, "queue_timeout_s": 60},
            TIGHT: {"queue_timeout_s": 30, "queue_max_requests": 2},
            FAIR: {"queue_timeout_s": 60},
        },
        "auth": {"require_keys": True},
    }
    deploy(serve_url, config)
    return Pool(serve_url, ups, tight, fair)


class Client:
    """One key's requests: what each answered and how long it waited in the queue."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: str, model: str = "m/busy"):
        self.http, self.url, self.model = http, url, model
        self.headers = {"authorization": f"Bearer {key}"}
        self.statuses: Counter[int] = Counter()
        self.queued: list[float] = []

    async def ask(self, say: str = "q", **extra: str) -> tuple[int, dict, CIMultiDict[str]]:
        """`say`: the message's text, which the upstream records (who reached it, in order)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": say}]}
        async with self.http.post(
            f"{self.url}/v1/chat/completions", json=body, headers=self.headers | extra
        ) as resp:
            doc = await resp.json()
            self.statuses[resp.status] += 1
            self.queued.append(float(resp.headers.get("x-router-queued-ms", 0)))
            return resp.status, doc, resp.headers.copy()

    async def flood(self, stop: asyncio.Event, loops: int, say: str = "q") -> None:
        async def loop() -> None:
            while not stop.is_set():
                await self.ask(say)

        await asyncio.gather(*(loop() for _ in range(loops)))


async def test_a_flooding_key_does_not_hold_up_one_that_asks_now_and_then(pool: Pool) -> None:
    before = sum(up.count("/v1/chat/completions") for up in pool.ups)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        batch = Client(http, pool.url, await _key(http, pool.url))
        person = Client(http, pool.url, await _key(http, pool.url))
        stop = asyncio.Event()
        flood = asyncio.ensure_future(batch.flood(stop, 64))
        await until(lambda: _true(len(batch.queued) > 64), "the flood to back up")
        for _ in range(10):
            status, _, _ = await person.ask()
            assert status == 200
        stop.set()
        await flood
    # Everything was answered, once: no error, the upstreams saw each request once.
    assert set(batch.statuses) == {200} and set(person.statuses) == {200}
    asked = sum(batch.statuses.values()) + sum(person.statuses.values())
    assert sum(up.count("/v1/chat/completions") for up in pool.ups) - before == asked
    # The flood waited its turn behind itself; the other key's turn came at the next free slot.
    assert statistics.median(batch.queued[64:]) > 0
    assert max(person.queued) < statistics.median(batch.queued[64:])


async def _true(value: bool) -> bool:
    return value


async def test_weights_share_a_saturated_model_turn_by_turn(pool: Pool) -> None:
    """Weights 3 and 1, both keys always waiting on the model's one picker replica and one slot:
    the upstream sees the grants in the queue's order, and stride scheduling keeps the heavy
    key's count within one turn of 3 x the light key's over every stretch of that order."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        heavy = Client(http, pool.url, await _key(http, pool.url, weight=3), "m/fair")
        light = Client(http, pool.url, await _key(http, pool.url, weight=1), "m/fair")
        seen = len(pool.fair.requests)
        stop = asyncio.Event()
        floods = [
            asyncio.ensure_future(heavy.flood(stop, 16, "heavy")),
            asyncio.ensure_future(light.flood(stop, 16, "light")),
        ]
        # Past the first answers (both keys' requests in arrival order, before a backlog).
        await until(lambda: _true(len(heavy.queued) + len(light.queued) > 32), "a backlog")
        start = len(pool.fair.requests)
        await until(lambda: _true(len(pool.fair.requests) - start >= 160), "160 grants", timeout=90)
        stop.set()
        await asyncio.gather(*floods)
    assert set(heavy.statuses) == {200} and set(light.statuses) == {200}
    assert start > seen
    order = [r.body["messages"][0]["content"] for r in pool.fair.requests[start : start + 160]]
    # Every stretch between two light grants holds 2 to 4 heavy ones (3 when no tie between
    # the keys' turns is broken by arrival), so no stretch of the order drifts from 3:1 by
    # more than one turn.
    lights = [i for i, who in enumerate(order) if who == "light"]
    gaps = [b - a - 1 for a, b in itertools.pairwise(lights)]
    assert len(lights) >= 30 and all(2 <= gap <= 4 for gap in gaps), order
    assert all(abs(sum(gaps[i : i + 8]) - 24) <= 2 for i in range(len(gaps) - 8)), gaps


async def test_a_higher_priority_overtakes_the_backlog(pool: Pool) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        low = Client(http, pool.url, await _key(http, pool.url))
        high = Client(http, pool.url, await _key(http, pool.url, priority=5))
        chosen = Client(
            http, pool.url, await _key(http, pool.url, set_priority=True, max_priority=5)
        )
        stop = asyncio.Event()
        flood = asyncio.ensure_future(low.flood(stop, 64))
        await until(lambda: _true(len(low.queued) > 64), "the backlog")
        for _ in range(5):
            assert (await high.ask())[0] == 200
            assert (await chosen.ask(**{"x-priority": "5"}))[0] == 200
        status, doc, _ = await chosen.ask(**{"x-priority": "high"})
        assert (status, doc["error"]["param"]) == (400, "x-priority")
        stop.set()
        await flood
    backlog = statistics.median(low.queued[64:])
    assert max(high.queued) < backlog and max(chosen.queued[:5]) < backlog


async def test_a_full_model_times_out_lets_leavers_go_and_sheds(pool: Pool, http) -> None:
    low = Client(http, pool.url, await _key(http, pool.url), "m/tight")
    high = Client(http, pool.url, await _key(http, pool.url, priority=5), "m/tight")
    pool.tight.knobs.hold = True
    held = asyncio.ensure_future(low.ask("held"))  # takes the one slot
    await until(lambda: _true(pool.tight.active == 1), "the slot taken")
    # Waiting past its time (queue_timeout_s, capped by the request's own deadline): 429 with
    # Retry-After, in each client's dialect.
    status, doc, headers = await low.ask(**{"x-request-timeout": "1"})
    assert (status, doc["error"]["code"]) == (429, "queue_timeout") and headers["retry-after"]
    body = {"model": "m/tight", "max_tokens": 5, "messages": CHAT}
    capped = low.headers | {"x-request-timeout": "1"}
    async with http.post(f"{pool.url}/v1/messages", json=body, headers=capped) as resp:
        assert resp.status == 429 and (await resp.json())["type"] == "error"

    async def waiting(count: int) -> None:
        async def seen() -> bool:
            async with http.get(f"{pool.url}/api/v1/providers/state", headers=ADMIN) as resp:
                queues = (await resp.json())["queues"]
            return sum(queues.get("m/tight", {}).values()) == count

        await until(seen, f"{count} waiting")

    async def left() -> Counter[str]:
        """The tight model's waits that ended with its client gone, by how they were seen."""
        async with http.get(f"{pool.url}/metrics", headers=ADMIN) as resp:
            page = await resp.text()
        out: Counter[str] = Counter()
        for key, value in samples(page, "llm_router_queue_wait_seconds_count").items():
            outcome = re.search(r'outcome="(\w+)"', key)
            if 'model="m/tight"' in key and outcome and outcome[1] in ("left", "unclaimed"):
                out[outcome[1]] += int(value)
        return out

    # A client that leaves while it waits leaves the queue at once: its cancelled wait (or its
    # ingress's report) takes it out, not the 5 s guard against tickets nobody claims.
    before = await left()
    await waiting(0)  # the view (a second old at most) no longer shows the timed-out ones
    leaver = asyncio.ensure_future(low.ask())
    await waiting(1)
    leaver.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaver
    await waiting(0)

    async def counted() -> bool:
        return (await left()).total() > before.total()

    await until(counted, "the leaver counted")
    assert await left() - before == Counter(left=1)
    # Full (2 waiting): a higher priority sheds the newest low one; another low one is refused.
    first = asyncio.ensure_future(low.ask("first"))
    await waiting(1)
    second = asyncio.ensure_future(low.ask())
    await waiting(2)
    overtaking = asyncio.ensure_future(high.ask("high"))
    status, doc, headers = await second
    assert (status, doc["error"]["code"]) == (503, "shed") and headers["retry-after"]
    status, doc, _ = await low.ask()
    assert (status, doc["error"]["code"]) == (503, "shed")
    pool.tight.release()  # the slot frees: the higher priority goes first, then the low one
    assert (await overtaking)[0] == 200 and (await first)[0] == 200 and (await held)[0] == 200
    reached = [r.body["messages"][0]["content"] for r in pool.tight.requests]
    assert [who for who in reached if who in ("held", "high", "first")] == ["held", "high", "first"]
