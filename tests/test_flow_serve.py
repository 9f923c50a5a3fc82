"""Flow control on real Serve (2 picker replicas, keys required): demo upstreams of 2 slots
each (max_concurrency), a key that floods and one that asks now and then, weights, priorities;
a model whose queue times out, loses a client that left, and sheds."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import pytest
from multidict import CIMultiDict

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import ADMIN, deploy, provider, until

pytestmark = pytest.mark.serve

TYPE, TIGHT = "flowing_models", "tight_models"
CHAT = [{"role": "user", "content": "q"}]


@dataclass
class Pool:
    url: str
    ups: list[FakeUpstream]
    tight: FakeUpstream


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
    config = {
        TYPE: {
            "m/busy": {
                "providers": [provider(u.name, u.url, max_concurrency=2) for u in ups],
            }
        },
        TIGHT: {"m/tight": {"providers": [provider("tight", tight.url, max_concurrency=1)]}},
        "active_models": {TYPE: ["m/busy"], TIGHT: ["m/tight"]},
        "routing": {
            TYPE: {"num_replicas": 2, "queue_timeout_s": 60},
            TIGHT: {"queue_timeout_s": 30, "queue_max_requests": 2},
        },
        "auth": {"require_keys": True},
    }
    deploy(serve_url, config)
    return Pool(serve_url, ups, tight)


class Client:
    """One key's requests: what each answered and how long it waited in the queue."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: str, model: str = "m/busy"):
        self.http, self.url, self.model = http, url, model
        self.headers = {"authorization": f"Bearer {key}"}
        self.statuses: Counter[int] = Counter()
        self.queued: list[float] = []

    async def ask(self, **extra: str) -> tuple[int, dict, CIMultiDict[str]]:
        body = {"model": self.model, "messages": CHAT}
        async with self.http.post(
            f"{self.url}/v1/chat/completions", json=body, headers=self.headers | extra
        ) as resp:
            doc = await resp.json()
            self.statuses[resp.status] += 1
            self.queued.append(float(resp.headers.get("x-router-queued-ms", 0)))
            return resp.status, doc, resp.headers.copy()

    async def flood(self, stop: asyncio.Event, loops: int) -> None:
        async def loop() -> None:
            while not stop.is_set():
                await self.ask()

        await asyncio.gather(*(loop() for _ in range(loops)))


async def test_a_flooding_key_does_not_hold_up_one_that_asks_now_and_then(pool: Pool) -> None:
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
    assert sum(up.count("/v1/chat/completions") for up in pool.ups) >= asked
    # The flood waited its turn behind itself; the other key's turn came at the next free slot.
    assert statistics.median(batch.queued[64:]) > 0
    assert max(person.queued) < statistics.median(batch.queued[64:])


async def _true(value: bool) -> bool:
    return value


async def test_weights_share_a_saturated_model(pool: Pool) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        heavy = Client(http, pool.url, await _key(http, pool.url, weight=3))
        light = Client(http, pool.url, await _key(http, pool.url, weight=1))
        stop = asyncio.Event()
        # 48 clients each (under aiohttp's 100 connections), so each key keeps requests waiting
        # on both picker replicas: shares hold only while both keys wait (a replica holding none
        # of a key's requests gives the other its turns). With 32 each: 2.49:1 once, busy machine.
        floods = [asyncio.ensure_future(c.flood(stop, 48)) for c in (heavy, light)]
        # Past the first answers (both keys' requests in arrival order), 600 answers.
        await until(lambda: _true(len(heavy.queued) + len(light.queued) > 200), "a backlog")
        start = (len(heavy.queued), len(light.queued))
        await until(
            lambda: _true(len(heavy.queued) + len(light.queued) - sum(start) >= 600),
            "600 answers under overload",
            timeout=90,
        )
        served = (len(heavy.queued) - start[0], len(light.queued) - start[1])
        stop.set()
        await asyncio.gather(*floods)
    assert set(heavy.statuses) == {200} and set(light.statuses) == {200}
    assert 2.7 <= served[0] / served[1] <= 3.3, served


async def test_a_higher_priority_overtakes_the_backlog(pool: Pool) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        low = Client(http, pool.url, await _key(http, pool.url))
        high = Client(http, pool.url, await _key(http, pool.url, priority=5))
        chosen = Client(http, pool.url, await _key(http, pool.url, set_priority=True))
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
    held = asyncio.ensure_future(low.ask())  # takes the one slot
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

    # A client that leaves while it waits leaves the queue at once.
    leaver = asyncio.ensure_future(low.ask())
    await waiting(1)
    leaver.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaver
    await waiting(0)
    # Full (2 waiting): a higher priority sheds the newest low one; another low one is refused.
    first = asyncio.ensure_future(low.ask())
    await waiting(1)
    second = asyncio.ensure_future(low.ask())
    await waiting(2)
    overtaking = asyncio.ensure_future(high.ask())
    status, doc, headers = await second
    assert (status, doc["error"]["code"]) == (503, "shed") and headers["retry-after"]
    status, doc, _ = await low.ask()
    assert (status, doc["error"]["code"]) == (503, "shed")
    pool.tight.release()  # the slot frees: the higher priority goes first, then the low one
    assert (await overtaking)[0] == 200 and (await first)[0] == 200 and (await held)[0] == 200
    assert high.queued[-1] < low.queued[-1]
