"""Strategies whose state is shared by router replicas through the broker actor, on real Serve:
exclusive slots across replicas, nworkers limits, leases of a killed replica, fallback_model,
keep-alive of pinned Ollama models, runtime weights."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import aiohttp
import pytest
import ray

from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, deploy, free_port, provider, run_cluster_script, until

LEASE_S = 2.0


@dataclass
class Pool:
    url: str
    ups: dict[str, FakeUpstream]


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    names = ["e1", "e2", "n1", "n2", "n3", "hold", "k1", "a1", "a2", "slow1"]
    ups = {n: upstream_factory(n) for n in names}
    dead = f"http://127.0.0.1:{free_port()}"
    config = {
        "excl_models": {
            "m/excl": {"providers": [provider("e1", ups["e1"].url), provider("e2", ups["e2"].url)]},
            "m/hold": {"providers": [provider("hold", ups["hold"].url)]},
        },
        "nw_models": {
            "m/nw": {
                "providers": [
                    provider("n1", ups["n1"].url, nworkers=2),
                    provider("n2", ups["n2"].url, nworkers=3),
                    provider("n3", ups["n3"].url, nworkers=1),
                ]
            },
            "m/ka": {"providers": [provider("k1", ups["k1"].url, "ollama", keep_alive="1s")]},
        },
        "busy_models": {
            "m/busy": {
                "providers": [provider("slow1", ups["slow1"].url)],
                "fallback_model": "m/excl",
            },
            "m/busy-alone": {"providers": [provider("slow2", ups["slow1"].url + "/v1")]},
        },
        "dyn_models": {
            "m/alive": {
                "providers": [provider("a1", ups["a1"].url), provider("a2", ups["a2"].url)]
            },
            "m/dead": {
                "providers": [provider("d1", dead), provider("d2", dead + "/v1")],
                "fallback_model": "m/excl",
            },
            "m/dead-alone": {"providers": [provider("d3", dead + "/x")]},
        },
        "active_models": {
            "excl_models": ["m/excl", "m/hold"],
            "nw_models": ["m/nw", "m/ka"],
            "dyn_models": ["m/alive", "m/dead", "m/dead-alone"],
            "busy_models": ["m/busy", "m/busy-alone"],
        },
        "routing": {
            "default": {"num_replicas": 2, "lease_s": LEASE_S, "unhealthy_cooldown_s": 0},
            "excl_models": {"strategy": "first_available", "wait_timeout_s": 20},
            "nw_models": {"strategy": "first_available_optim_nworkers", "pin_ttl_s": 3},
            "dyn_models": {"strategy": "dynamic_weighted", "num_replicas": 1},
            "busy_models": {"strategy": "first_available", "num_replicas": 1, "wait_timeout_s": 1},
        },
    }
    deploy(serve_url, config)
    return Pool(serve_url, ups)


@pytest.fixture(autouse=True)
def _fresh(pool: Pool) -> None:
    for up in pool.ups.values():
        up.knobs = Knobs()
        up.peak = up.active


async def _ask(
    http: aiohttp.ClientSession, url: str, model: str, stream: bool = False
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": stream}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def _state(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(f"{url}/api/v1/providers/state", headers=ADMIN) as resp:
        assert resp.status == 200
        return await resp.json()


async def _under_load(http, pool: Pool, model: str, n: int) -> tuple[list, set[str]]:
    """n requests at once; returns their answers and every replica seen holding a slot."""
    holders: set[str] = set()
    calls = asyncio.gather(*(_ask(http, pool.url, model) for _ in range(n)))
    task = asyncio.ensure_future(calls)
    while not task.done():
        state = await _state(http, pool.url)
        holders.update(h for hs in state["holders"].values() for h in hs)
        await asyncio.sleep(0.05)
    return await task, holders


async def test_first_available_never_puts_two_requests_on_one_provider(pool: Pool, http) -> None:
    for name in ("e1", "e2"):
        pool.ups[name].knobs = Knobs(latency_s=0.15)
    answers, holders = await _under_load(http, pool, "m/excl", 24)
    assert [status for status, _, _ in answers] == [200] * 24
    served = Counter(h["x-router-provider"] for _, h, _ in answers)
    assert set(served) == {"e1", "e2"} and sum(served.values()) == 24
    assert pool.ups["e1"].peak == 1 and pool.ups["e2"].peak == 1
    # both router replicas took slots: the exclusivity held across them
    assert len({h for h in holders if h.startswith("router-excl_models")}) == 2, holders


async def test_nworkers_limits_hold_across_replicas_under_load(pool: Pool, http) -> None:
    for name in ("n1", "n2", "n3"):
        pool.ups[name].knobs = Knobs(latency_s=0.2)
    answers, holders = await _under_load(http, pool, "m/nw", 40)
    assert [status for status, _, _ in answers] == [200] * 40
    peaks = {n: pool.ups[n].peak for n in ("n1", "n2", "n3")}
    assert peaks == {"n1": 2, "n2": 3, "n3": 1}
    assert len({h for h in holders if h.startswith("router-nw_models")}) == 2, holders


async def test_a_killed_replicas_slots_come_back_within_the_lease(pool: Pool, http) -> None:
    hold = pool.ups["hold"]
    hold.knobs = Knobs(hold=True)  # the request holds the only slot until released
    stuck = asyncio.ensure_future(_ask(http, pool.url, "m/hold"))
    holder: list[str] = []

    async def taken() -> bool:
        holder[:] = (await _state(http, pool.url))["holders"].get("hold", [])
        return len(holder) == 1

    await until(taken, "the slot to be taken")
    replica = holder[0].split(":", 1)[1]
    actor = ray.get_actor(f"SERVE_REPLICA::llm-router#router-excl_models#{replica}", "serve")
    ray.kill(actor, no_restart=True)
    # The picker only planned the request: the ingress carries it, so its client is answered.
    hold.release()
    status, headers, _ = await stuck
    assert status == 200 and headers["x-router-provider"] == "hold"

    async def returned() -> bool:
        return "hold" not in (await _state(http, pool.url))["busy"]

    # Nobody releases the slot (its holder is dead): only the lease's expiry brings it back.
    await until(returned, "the lease to expire", timeout=LEASE_S * 4 + 30)
    status, headers, _ = await _ask(http, pool.url, "m/hold")
    assert status == 200 and headers["x-router-provider"] == "hold"


async def test_a_request_that_leaves_while_waiting_gives_its_slot_back(pool: Pool, http) -> None:
    pool.ups["hold"].knobs = Knobs(latency_s=1.0)
    first = asyncio.ensure_future(_ask(http, pool.url, "m/hold"))

    async def taken() -> bool:
        return (await _state(http, pool.url))["busy"].get("hold") == 1

    await until(taken, "the slot to be taken")
    body = {"model": "m/hold", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with pytest.raises(TimeoutError):  # this client gives up while its request waits
        async with http.post(
            f"{pool.url}/v1/chat/completions",
            json=body,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as resp:
            await resp.read()
    assert (await first)[0] == 200

    async def given_back() -> bool:
        async with http.get(f"{pool.url}/metrics", headers=ADMIN) as resp:
            text = await resp.text()
        return 'llm_router_slot_takes_total{path="abandoned"} 1.0' in text

    await until(given_back, "the late grant to be given back")
    pool.ups["hold"].knobs = Knobs()
    status, headers, _ = await _ask(http, pool.url, "m/hold")
    assert status == 200 and headers["x-router-provider"] == "hold"


async def test_fallback_model_serves_when_every_provider_is_down(pool: Pool, http) -> None:
    for stream in (False, True):
        status, headers, body = await _ask(http, pool.url, "m/dead", stream=stream)
        assert status == 200, body
        assert headers["x-router-fallback-model"] == "m/excl"
        assert headers["x-router-provider"] in {"e1", "e2"}
        assert "x-router-unservable" not in headers
        assert b'"m/excl"' in body  # the fallback's upstream answered
    status, headers, body = await _ask(http, pool.url, "m/dead-alone")
    assert status == 503 and "x-router-fallback-model" not in headers
    assert "x-router-unservable" not in headers


async def test_busy_past_the_wait_is_503_or_the_fallback(pool: Pool, http) -> None:
    pool.ups["slow1"].knobs = Knobs(latency_s=4.0)  # each provider holds its one slot 4 s
    hogs = [asyncio.ensure_future(_ask(http, pool.url, m)) for m in ("m/busy", "m/busy-alone")]

    async def both_taken() -> bool:
        busy = (await _state(http, pool.url))["busy"]
        return busy.get("slow1") == 1 and busy.get("slow2") == 1

    await until(both_taken, "both slots to be taken")
    status, headers, body = await _ask(http, pool.url, "m/busy-alone")
    assert status == 503 and b"no_free_provider" in body
    assert headers["retry-after"] == "1"
    status, headers, body = await _ask(http, pool.url, "m/busy")
    assert status == 200 and headers["x-router-fallback-model"] == "m/excl"
    assert [s for s, _, _ in await asyncio.gather(*hogs)] == [200, 200]


async def test_keep_alive_rewarms_a_pinned_model_until_the_pin_lapses(pool: Pool, http) -> None:
    k1 = pool.ups["k1"]
    k1.requests.clear()
    status, _, _ = await _ask(http, pool.url, "m/ka")
    assert status == 200
    sent = [r.body for r in k1.requests if r.path == "/api/chat"]
    assert sent and sent[0]["keep_alive"] == "1s"  # on every request

    def warms() -> list[dict]:
        return [r.body for r in k1.requests if r.path == "/api/generate"]

    async def warmed_twice() -> bool:
        return len(warms()) >= 2

    await until(warmed_twice, "two keep-alive warms", timeout=5)
    assert warms()[0] == {"model": "m/ka", "keep_alive": "1s", "stream": False}

    async def unpinned() -> bool:
        return not any(m == "m/ka" for m in (await _state(http, pool.url))["pins"].values())

    await until(unpinned, "the pin to lapse (3 s idle)", timeout=8)
    after = len(warms())
    deadline = asyncio.get_running_loop().time() + 2.0  # 2 keep_alive periods: no more warms
    while asyncio.get_running_loop().time() < deadline:
        assert len(warms()) <= after + 1  # one may have been under way as the pin lapsed
        await asyncio.sleep(0.1)


async def test_runtime_weights_through_the_admin_api(pool: Pool, http) -> None:
    url = f"{pool.url}/api/v1/weights"
    async with http.post(url, json={"model": "m/alive", "weights": {"a2": 0}}, headers=ADMIN) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["changed"] is True
    assert not [r for r in answer["unconfirmed_replicas"] if "dyn_models" in r]
    served = Counter()
    for _ in range(12):
        status, headers, _ = await _ask(http, pool.url, "m/alive")
        assert status == 200
        served[headers["x-router-provider"]] += 1
    assert served == {"a1": 12}
    bad = [
        ({"model": "m/alive", "weights": {"zz": 1}}, "zz"),
        ({"model": "m/alive", "weights": {"a1": -1}}, "greater than or equal"),
        ({"model": "m/nope", "weights": {"a1": 1}}, "not an active model"),
        ({"model": "m/alive", "weights": {}}, "at least 1"),
    ]
    for body, why in bad:
        async with http.post(url, json=body, headers=ADMIN) as r:
            assert r.status == 400 and why in (await r.json())["error"]["message"], body
    async with http.post(url, json={"model": "m/alive", "weights": {"a2": 1}}) as r:
        assert r.status == 401
    async with http.post(url, json={"model": "m/alive", "weights": {"a2": 1}}, headers=ADMIN) as r:
        assert r.status == 200


async def test_dynamic_weighted_moves_share_away_from_a_slow_provider(pool: Pool, http) -> None:
    pool.ups["a2"].knobs = Knobs(latency_s=0.1)
    served = Counter()
    for i in range(60):
        status, headers, _ = await _ask(http, pool.url, "m/alive")
        assert status == 200
        if i >= 20:  # after the first latency samples are shared
            served[headers["x-router-provider"]] += 1
    assert served["a2"] <= 10, served  # equal weights would give it 20 of 40
    state = await _state(http, pool.url)
    # a2 answers no sooner than its 0.1 s of latency, a1 with none added
    assert state["latency"]["a2"] >= 0.1 and state["latency"]["a2"] > state["latency"]["a1"]


def test_slots_are_exclusive_across_nodes_and_leases_outlive_no_node() -> None:
    out = run_cluster_script("tests.multinode_leases")
    assert len(set(out["nodes"])) == 2 and out["head"] not in out["nodes"]
    # each node's actor made 40 calls over both providers, never two on one at once
    assert [sum(s.values()) for s in out["served"]] == [40, 40]
    assert all(set(s) == {"p1", "p2"} for s in out["served"])
    assert out["peaks"] == {"p1": 1, "p2": 1}
    # the slot held on the killed node came back (its lease expired), to the other node
    assert out["retaken"] == out["held"]
