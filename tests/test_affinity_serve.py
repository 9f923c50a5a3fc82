"""Cache- and load-aware routing on real Serve with demo upstreams that speak vLLM's /metrics:
prefix affinity holds across two router replicas (the index shared through the broker),
sessions stick across replicas and re-home with no failed request when their provider is
killed, and least_loaded follows the upstreams' own queue figures."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pytest

from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, deploy, provider, until

pytestmark = pytest.mark.serve

FAST_PROBES = {"health_check_interval_s": 0.2, "health_check_timeout_s": 0.5}


@dataclass
class Pool:
    url: str
    ups: dict[str, FakeUpstream]


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    ups = {n: upstream_factory(n) for n in ("x1", "x2", "x3", "s1", "s2", "s3", "l1", "l2", "l3")}

    def providers(prefix: str) -> list[dict]:
        return [provider(f"{prefix}{i}", ups[f"{prefix}{i}"].url, "vllm") for i in (1, 2, 3)]

    config = {
        "prefix_models": {"m/prefix": {"providers": providers("x")}},
        "session_models": {"m/session": {"providers": providers("s")}},
        "loaded_models": {"m/loaded": {"providers": providers("l")}},
        "active_models": {
            "prefix_models": ["m/prefix"],
            "session_models": ["m/session"],
            "loaded_models": ["m/loaded"],
        },
        "routing": {
            "prefix_models": {
                "strategy": "prefix_affinity",
                "num_replicas": 2,
                "prefix_block_chars": 64,
                # Turns go one by one, but a request counts in flight until its done report
                # comes, and a queued request (512 tokens by default) outweighs these short
                # prompts' hits: stickiness here, the cost is unit-tested.
                "kv_aware": {"waiting_request_tokens": 0},
                **FAST_PROBES,
            },
            "session_models": {
                "strategy": "session_affinity",
                "num_replicas": 2,
                "max_load_imbalance": 1000,  # 24 at once: stickiness, not the bound (unit-tested)
                "unhealthy_cooldown_s": 30,
                "circuit_failures": 1,
                "circuit_cooldown_s": 0.5,
                **FAST_PROBES,
            },
            "loaded_models": {"strategy": "least_loaded", **FAST_PROBES},
        },
    }
    deploy(serve_url, config)
    return Pool(serve_url, ups)


async def _chat(
    http: aiohttp.ClientSession, url: str, model: str, messages: list[dict], **headers: str
) -> tuple[int, str]:
    """Status and the provider that answered."""
    body = {"model": model, "messages": messages}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-router-provider", "")


async def _state(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(f"{url}/api/v1/providers/state", headers=ADMIN) as resp:
        assert resp.status == 200
        return await resp.json()


async def _known_everywhere(
    http: aiohttp.ClientSession, url: str, check: Callable[[dict], bool], what: str
) -> None:
    """Until the monitor's state passes `check` and every router replica has applied that
    health view (signals and circuits reach replicas by long-poll)."""
    since: list[int] = []

    async def known() -> bool:
        state = await _state(http, url)
        if not since and check(state["providers"]):
            since.append(state["health"]["version"])
        followers = state["health"]["followers"].values()
        return bool(since) and all(version >= since[0] for version in followers)

    await until(known, f"{what}, known to every replica")


async def test_prefix_affinity_holds_across_router_replicas(pool: Pool, http) -> None:
    sent = 0

    async def index_everywhere() -> bool:
        """The broker has a chain of every request sent and both replicas have them all."""
        index = (await _state(http, pool.url))["prefix_index"]
        followers = index["followers"]
        return (
            index["seq"] == sent
            and len(followers) == 2
            and all(seen == sent for seen in followers.values())
        )

    served: dict[int, list[str]] = defaultdict(list)
    histories = {
        c: [{"role": "system", "content": f"conversation {c}: " + "rules. " * 80}] for c in range(9)
    }
    for turn in range(4):
        for c, history in histories.items():
            history.append({"role": "user", "content": f"turn {turn}"})
            status, who = await _chat(http, pool.url, "m/prefix", history)
            assert status == 200
            sent += 1
            served[c].append(who)
            history.append({"role": "assistant", "content": f"{who} answers"})
        # Each turn is routed only once both replicas have every chain of the one before.
        await until(index_everywhere, "both replicas to hold the whole prefix index")
    assert all(len(set(who)) == 1 for who in served.values()), served
    assert len({who[0] for who in served.values()}) >= 2  # conversations spread
    state = await _state(http, pool.url)
    routed_by = state["prefix_index"]["routed_by"]  # both replicas routed turns
    assert len(routed_by) == 2 and min(routed_by.values()) > 0, routed_by
    for pid in ("x1", "x2", "x3"):
        row = state["providers"][pid]
        assert row["circuit"] == "closed"
        assert row["signals"] == {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0, "loaded": None}
    entries = {pid: state["providers"][pid]["prefix_index_entries"] for pid in ("x1", "x2", "x3")}
    assert sum(entries.values()) > 0 and entries == {
        pid: n for pid, n in state["prefix_index"]["entries"].items() if pid in entries
    }


async def test_sessions_stick_and_rehome_with_no_failed_request(pool: Pool, http) -> None:
    sessions = [f"session-{i}" for i in range(24)]
    homes: dict[str, set[str]] = defaultdict(set)
    failed: list[int] = []

    async def round_of_requests(record: dict[str, set[str]]) -> None:
        async def one(s: str) -> None:
            msgs = [{"role": "user", "content": s}]
            status, who = await _chat(http, pool.url, "m/session", msgs, **{"x-session-id": s})
            if status != 200:
                failed.append(status)
            record[s].add(who)

        await asyncio.gather(*(one(s) for s in sessions))

    for _ in range(3):
        await round_of_requests(homes)
    assert failed == [] and all(len(who) == 1 for who in homes.values()), homes
    home = {s: next(iter(who)) for s, who in homes.items()}
    assert len(set(home.values())) == 3
    # The body's `user` is the session when there is no header.
    body_user = [{"role": "user", "content": "hi"}]
    for s in sessions[:6]:
        body = {"model": "m/session", "messages": body_user, "user": s}
        async with http.post(f"{pool.url}/v1/chat/completions", json=body) as resp:
            assert resp.headers["x-router-provider"] == home[s]

    victim = Counter(home.values()).most_common(1)[0][0]
    port = pool.ups[victim].port
    pool.ups[victim].stop_thread()
    moved: dict[str, set[str]] = defaultdict(set)
    for _ in range(3):
        await round_of_requests(moved)
    assert failed == [], f"requests failed while {victim} was down: {failed}"
    for s, who in moved.items():
        if home[s] != victim:
            assert who == {home[s]}, (s, who)  # only the victim's sessions move
        else:
            assert len(who) == 1 and victim not in who, (s, who)  # each to one new home

    pool.ups[victim].start_in_thread(port=port)

    await _known_everywhere(
        http, pool.url, lambda ps: ps[victim]["circuit"] == "closed", f"{victim} back"
    )
    back: dict[str, set[str]] = defaultdict(set)
    await round_of_requests(back)
    assert failed == [] and {s: next(iter(w)) for s, w in back.items()} == home


async def test_least_loaded_follows_the_upstreams_queues(pool: Pool, http) -> None:
    l1, l2, l3 = (pool.ups[n] for n in ("l1", "l2", "l3"))
    l1.knobs, l2.knobs, l3.knobs = Knobs(waiting=50), Knobs(waiting=20), Knobs()

    def scraped(want: dict[str, float]) -> Callable[[dict], bool]:
        return lambda ps: all((ps[p]["signals"] or {}).get("waiting") == w for p, w in want.items())

    msgs = [{"role": "user", "content": "q"}]
    await _known_everywhere(http, pool.url, scraped({"l1": 50, "l2": 20, "l3": 0}), "the queues")
    picks = Counter([(await _chat(http, pool.url, "m/loaded", msgs))[1] for _ in range(12)])
    assert picks == {"l3": 12}
    l3.knobs = Knobs(waiting=30, kv_usage=1.0)
    await _known_everywhere(http, pool.url, scraped({"l3": 30}), "l3's queue")
    picks = Counter([(await _chat(http, pool.url, "m/loaded", msgs))[1] for _ in range(12)])
    assert picks == {"l2": 12}
    for up in (l1, l2, l3):
        up.knobs = Knobs()
