"""Live config on real Serve: reload and file watching reach every replica without a restart."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import ray

from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, REGISTRY, deploy, provider, until

pytestmark = pytest.mark.serve

TYPE = "live_models"
SECRET = "live-secret-token-42"


@dataclass
class Live:
    url: str
    file: Path
    base: dict
    ups: dict[str, FakeUpstream]

    def write(self, config: dict) -> None:
        self.file.write_bytes(orjson.dumps(config))

    def config(self) -> dict:
        return copy.deepcopy(self.base)


@pytest.fixture(scope="module")
def live(serve_url: str, upstream_factory, tmp_path_factory) -> Live:
    ups = {n: upstream_factory(n) for n in ("la", "lb", "slow", "fresh")}
    ups["slow"].knobs = Knobs(chunks=5, chunk_delay_s=0.2)
    config = {
        TYPE: {
            "m/live": {
                "providers": [
                    provider("la", ups["la"].url, api_token=SECRET),
                    provider("lb", ups["lb"].url),
                ]
            },
            "m/slow": {"providers": [provider("slow", ups["slow"].url)]},
            "m/later": {"providers": [provider("fresh", ups["fresh"].url)]},
        },
        "active_models": {TYPE: ["m/live", "m/slow"]},
        "routing": {TYPE: {"num_replicas": 2, "strategy": "weighted_random"}},
    }
    file = tmp_path_factory.mktemp("live") / "models-config.json"
    file.write_bytes(orjson.dumps(config))
    # A short ack deadline: a reload answers "confirmed" only if every replica follows in 1 s.
    deploy(serve_url, config, models_config=str(file), ack_timeout_s=1.0, watch_config=True)
    return Live(serve_url, file, config, ups)


@pytest.fixture
def restore(live: Live) -> Iterator[None]:
    yield
    live.write(live.base)
    asyncio.run(_reload(live))


async def _reload(live: Live, headers: dict[str, str] = ADMIN) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{live.url}/api/v1/config/reload", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def _chat(http: aiohttp.ClientSession, url: str, model: str) -> tuple[int, str, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        text = await resp.text()
        return resp.status, resp.headers.get("x-router-provider", ""), text


async def _providers(http: aiohttp.ClientSession, live: Live, model: str, n: int) -> Counter:
    results = await asyncio.gather(*(_chat(http, live.url, model) for _ in range(n)))
    assert all(status == 200 for status, _, _ in results), results
    return Counter(p for _, p, _ in results)


def _content(sse: str) -> str:
    events = [line[6:] for line in sse.splitlines() if line.startswith("data: {")]
    return "".join(
        c["delta"].get("content") or "" for e in events for c in orjson.loads(e)["choices"]
    )


async def _config_status(http: aiohttp.ClientSession, live: Live) -> dict:
    async with http.get(f"{live.url}/api/v1/config", headers=ADMIN) as resp:
        assert resp.status == 200
        return await resp.json()


async def test_a_weight_change_reaches_both_router_replicas(live: Live, http, restore) -> None:
    status = await _config_status(http, live)
    routers = [r for r in status["replicas"] if r.startswith(f"router-{TYPE}:")]
    assert len(routers) == 2
    assert set((await _providers(http, live, "m/live", 60)).keys()) == {"la", "lb"}

    config = live.config()
    config[TYPE]["m/live"]["providers"][1]["weight"] = 0  # lb only as a fallback
    live.write(config)
    code, answer = await _reload(live)
    assert code == 200 and answer["changed"], answer
    # Every replica (both routers and the ingress) confirmed within the 1 s ack deadline.
    assert answer["unconfirmed_replicas"] == []
    assert (await _reload(live))[1]["changed"] is False  # the same file again
    versions = (await _config_status(http, live))["replicas"]
    assert all(versions[r] == answer["version"] for r in routers)
    assert await _providers(http, live, "m/live", 60) == Counter({"la": 60})


async def test_streams_in_flight_finish_when_their_provider_is_removed(
    live: Live, http, restore
) -> None:
    slow = live.ups["slow"]
    slow.knobs = Knobs(chunks=5, hold_mid_stream=True)  # each stream waits after its first chunk
    begun = 0

    async def stream() -> tuple[int, str]:
        nonlocal begun
        body = {
            "model": "m/slow",
            "messages": [{"role": "user", "content": "abcde"}],
            "stream": True,
        }
        async with http.post(f"{live.url}/v1/chat/completions", json=body) as resp:
            first = await resp.content.readany()
            begun += 1
            return resp.status, (first + await resp.read()).decode()

    streams = [asyncio.ensure_future(stream()) for _ in range(6)]
    try:

        async def all_begun() -> bool:
            return begun == 6

        await until(all_begun, "every stream's first bytes to reach its client")
        config = live.config()
        config[TYPE]["m/slow"]["providers"] = [provider("fresh", live.ups["fresh"].url)]
        live.write(config)
        code, _ = await _reload(live)
        assert code == 200
        assert not any(s.done() for s in streams)  # each began before the reload, ends after
    finally:
        slow.release()
        slow.knobs = Knobs(chunks=5, chunk_delay_s=0.2)
    for status, text in await asyncio.gather(*streams):
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        assert _content(text) == "slow: abcde"
    assert await _providers(http, live, "m/slow", 5) == Counter({"fresh": 5})


async def test_a_broken_file_is_refused_and_the_running_config_stays(
    live: Live, http, restore
) -> None:
    before = (await _config_status(http, live))["version"]
    live.file.write_bytes(b'{"active_models": ')
    code, answer = await _reload(live)
    assert code == 400 and answer["error"]["code"] == "invalid_config"
    assert "not valid JSON" in answer["error"]["message"]

    config = live.config()
    config[TYPE]["m/live"]["providers"][0]["input_size"] = "lots"
    live.write(config)
    code, answer = await _reload(live)
    assert code == 400
    assert f'$.{TYPE}["m/live"].providers[0].input_size' in answer["error"]["message"]
    assert (await _config_status(http, live))["version"] == before
    assert sum((await _providers(http, live, "m/live", 4)).values()) == 4


async def test_models_come_and_go_and_a_new_type_asks_for_a_redeploy(
    live: Live, http, restore
) -> None:
    config = live.config()
    config["active_models"][TYPE] = ["m/live", "m/later"]
    config["other_models"] = {"m/other": {"providers": [provider("o", live.ups["la"].url)]}}
    config["active_models"]["other_models"] = ["m/other"]
    live.write(config)
    code, answer = await _reload(live)
    assert code == 200 and answer["needs_redeploy"] == ["other_models"]
    assert (await _chat(http, live.url, "m/later"))[:2] == (200, "fresh")
    status, _, text = await _chat(http, live.url, "m/slow")
    assert status == 404 and "model_not_found" in text
    status, _, text = await _chat(http, live.url, "m/other")
    assert status == 503 and "model_type_not_deployed" in text


async def test_the_watcher_publishes_an_edited_file(live: Live, http, restore) -> None:
    config = live.config()
    config["active_models"][TYPE] = ["m/live", "m/slow", "m/later"]
    live.write(config)  # no reload call: the watcher sees the write

    async def listed() -> set[str]:
        async with http.get(f"{live.url}/v1/models") as resp:
            return {m["id"] for m in (await resp.json())["data"]}

    deadline = asyncio.get_running_loop().time() + 15
    while "m/later" not in await listed():
        assert asyncio.get_running_loop().time() < deadline, "the watcher did not publish"
        await asyncio.sleep(0.05)
    assert (await _chat(http, live.url, "m/later"))[:2] == (200, "fresh")


@pytest.mark.parametrize("path", ["/api/v1/config/reload", "/api/v1/adapters"])
async def test_admin_endpoints_need_the_token(live: Live, http, path: str) -> None:
    for headers, status, code in [
        ({}, 401, "missing_admin_token"),
        ({"authorization": "Bearer nope"}, 403, "invalid_admin_token"),
    ]:
        async with http.post(f"{live.url}{path}", headers=headers, json={}) as resp:
            assert resp.status == status
            assert (await resp.json())["error"]["code"] == code


async def test_the_registry_outlives_a_router_replica(live: Live, http) -> None:
    registry = REGISTRY.handle()
    version = (await registry.current.remote()).version
    actor_id = registry._actor_id
    routers = {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::llm-router#router-{TYPE}#")
    }
    victim = sorted(routers)[0]
    victim_id = victim.rsplit("#", 1)[1]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    async def replaced() -> bool:
        followers = await registry.followers.remote()
        fresh = [f for f in followers if f.startswith(f"router-{TYPE}:") and victim_id not in f]
        return len(fresh) == 2 and all(followers[f] == version for f in fresh)

    deadline = asyncio.get_running_loop().time() + 60
    while not await replaced():
        assert asyncio.get_running_loop().time() < deadline, "no replacement replica followed"
        await asyncio.sleep(0.1)
    assert REGISTRY.handle()._actor_id == actor_id  # the same registry, not a new one
    assert (await registry.current.remote()).version == version
    assert sum((await _providers(http, live, "m/live", 10)).values()) == 10


async def test_admin_answers_never_carry_an_api_token(live: Live, http) -> None:
    for path in ("/api/v1/config", "/api/v1/adapters"):
        async with http.get(f"{live.url}{path}", headers=ADMIN) as resp:
            assert resp.status == 200 and SECRET not in await resp.text()
    code, answer = await _reload(live)
    assert code == 200 and SECRET not in orjson.dumps(answer).decode()


async def test_replicas_keep_serving_without_the_registry_and_bring_it_back(
    live: Live, http
) -> None:
    registry = REGISTRY.handle()
    version = (await registry.current.remote()).version
    ray.kill(registry, no_restart=True)
    # Serving does not depend on the registry being up.
    assert sum((await _providers(http, live, "m/live", 10)).values()) == 10

    # The replicas' followers re-create it from its file and follow it again.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        async with http.get(f"{live.url}/api/v1/config", headers=ADMIN) as resp:
            if resp.status == 200:
                status = await resp.json()
                replicas = [r for r in status["replicas"] if r.startswith(("ingress:", "router-"))]
                if len(replicas) == 3:  # the ingress and both routers
                    break
        assert asyncio.get_running_loop().time() < deadline, "the registry did not come back"
        await asyncio.sleep(0.1)
    assert status["version"] == version
    assert set(status["replicas"].values()) == {version}
