"""LoRA adapters on real Serve: registration, routing to loaded versions, rolling updates."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import pytest

from serve_app.demo_upstream import FakeUpstream
from tests.conftest import ADMIN, deploy, provider, wait_for

pytestmark = pytest.mark.serve

TYPE = "lora_models"


@dataclass
class Pool:
    url: str
    va: FakeUpstream
    vb: FakeUpstream
    vo: FakeUpstream


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    va, vb, vo = (upstream_factory(n) for n in ("va", "vb", "vo"))
    config = {
        TYPE: {
            "m/base": {
                "providers": [
                    provider("va", va.url, "vllm"),
                    provider("vb", vb.url, "vllm"),
                    provider("vo", vo.url, "ollama"),
                ]
            },
            "plain": {"providers": [provider("vp", va.url)]},
        },
        "active_models": {TYPE: ["m/base", "plain"]},
        "routing": {TYPE: {"num_replicas": 2}},
    }
    deploy(serve_url, config)
    return Pool(serve_url, va, vb, vo)


async def _register(http: aiohttp.ClientSession, url: str, body: object) -> tuple[int, dict]:
    async with http.post(f"{url}/api/v1/adapters", json=body, headers=ADMIN) as resp:
        return resp.status, await resp.json()


async def _ask(http: aiohttp.ClientSession, url: str, model: str) -> tuple[int, str, str]:
    """Status, provider, and the model name the upstream served (the vLLM adapter version)."""
    body = {"model": model, "messages": [{"role": "user", "content": "q"}]}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        doc = await resp.json()
        return resp.status, resp.headers.get("x-router-provider", ""), doc.get("model", "")


async def test_an_adapter_is_loaded_on_vllm_providers_and_served_from_them(
    pool: Pool, http
) -> None:
    status, answer = await _register(
        http, pool.url, {"base_model": "m/base", "name": "sql", "source": "/adapters/sql/1"}
    )
    assert status == 201, answer
    assert answer["version"] == 1 and answer["unconfirmed_replicas"] == []
    assert {r["provider"]: r["status"] for r in answer["providers"]} == {
        "va": "loaded",
        "vb": "loaded",
    }
    assert pool.va.loras["sql@v1"] == pool.vb.loras["sql@v1"] == "/adapters/sql/1"

    async with http.get(f"{pool.url}/v1/models") as resp:
        listed = {m["id"]: m for m in (await resp.json())["data"]}
    assert listed["sql"]["parent"] == "m/base"

    results = await asyncio.gather(*(_ask(http, pool.url, "sql") for _ in range(30)))
    assert {r[0] for r in results} == {200}
    assert {r[2] for r in results} == {"sql@v1"}
    assert set(Counter(r[1] for r in results)) <= {"va", "vb"}  # never the ollama provider

    async with http.get(f"{pool.url}/api/v1/adapters", headers=ADMIN) as resp:
        report = {a["name"]: a for a in (await resp.json())["data"]}
    rows = {r["provider"]: r for r in report["sql"]["providers"]}
    assert rows["va"]["loaded_versions"] == [1] and rows["vb"]["status"] == "current"
    assert rows["vo"]["status"] == "unsupported" and "ollama" in rows["vo"]["detail"]


async def test_a_version_is_served_only_where_it_loaded(pool: Pool, http) -> None:
    pool.va.knobs.lora_fail_status = 500
    try:
        status, answer = await _register(
            http, pool.url, {"base_model": "m/base", "name": "partial", "source": "/p/1"}
        )
    finally:
        pool.va.knobs.lora_fail_status = None
    assert status == 201
    rows = {r["provider"]: r for r in answer["providers"]}
    assert rows["va"]["status"] == "failed" and "HTTP 500" in rows["va"]["detail"]
    results = await asyncio.gather(*(_ask(http, pool.url, "partial") for _ in range(20)))
    assert set(results) == {(200, "vb", "partial@v1")}


async def test_a_rolling_update_under_load_fails_nothing_and_serves_nothing_stale(
    pool: Pool, http
) -> None:
    body = {"base_model": "m/base", "name": "roll", "source": "/roll/1"}
    assert (await _register(http, pool.url, body))[0] == 201
    total, workers = 400, 8
    done: list[tuple[float, int, str]] = []
    halfway = asyncio.Event()
    acked_at: list[float] = []

    async def worker() -> None:
        while len(done) + workers <= total:
            sent = time.monotonic()
            status, _, served = await _ask(http, pool.url, "roll")
            done.append((sent, status, served))
            if len(done) >= total // 3:
                halfway.set()

    async def update() -> None:
        await halfway.wait()
        status, answer = await _register(http, pool.url, {**body, "source": "/roll/2"})
        acked_at.append(time.monotonic())
        assert status == 201 and answer["unconfirmed_replicas"] == [], answer

    await asyncio.gather(update(), *(worker() for _ in range(workers)))
    assert len(done) >= total - workers
    assert [d for d in done if d[1] != 200] == []
    after = [served for sent, _, served in done if sent > acked_at[0]]
    assert len(after) >= 50, "the update finished too late to test anything"
    assert set(after) == {"roll@v2"}
    assert {served for _, _, served in done} == {"roll@v1", "roll@v2"}

    for up in (pool.va, pool.vb):
        await asyncio.to_thread(
            wait_for, lambda up=up: "roll@v1" not in up.loras, 15, "roll@v1 unloaded"
        )
        assert up.loras["roll@v2"] == "/roll/2"
        assert {"lora_name": "roll@v1"} in [
            r.body for r in up.requests if r.path == "/v1/unload_lora_adapter"
        ]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"base_model": "m/nope", "name": "x", "source": "/x"}, 404, "unknown_base_model"),
        ({"base_model": "m/base", "name": "plain", "source": "/x"}, 409, "adapter_name_clash"),
        ({"base_model": "m/base", "name": "a/b", "source": "/x"}, 400, "invalid_adapter_name"),
        ({"base_model": "m/base", "name": "m.plain", "source": ""}, 400, "invalid_adapter"),
        ({"base_model": "m/base", "name": "nosource"}, 400, "invalid_adapter"),
        ({"base_model": "plain", "name": "x", "source": "/x"}, 400, "no_vllm_provider"),
        ({"base_model": "m/base", "name": "x", "source": "/x", "extra": 1}, 400, "invalid_adapter"),
        (["not", "an", "object"], 400, "invalid_adapter"),
    ],
)
async def test_bad_registrations_get_clear_4xx(
    pool: Pool, http, body: object, status: int, code: str
) -> None:
    got, answer = await _register(http, pool.url, body)
    assert (got, answer["error"]["code"]) == (status, code), answer


async def test_a_load_that_fails_everywhere_changes_nothing(pool: Pool, http) -> None:
    pool.va.knobs.lora_fail_status = pool.vb.knobs.lora_fail_status = 503
    try:
        status, answer = await _register(
            http, pool.url, {"base_model": "m/base", "name": "broken", "source": "/b"}
        )
    finally:
        pool.va.knobs.lora_fail_status = pool.vb.knobs.lora_fail_status = None
    assert status == 502 and answer["error"]["code"] == "adapter_load_failed"
    assert "va: HTTP 503" in answer["error"]["message"]
    async with http.get(f"{pool.url}/api/v1/adapters", headers=ADMIN) as resp:
        assert "broken" not in {a["name"] for a in (await resp.json())["data"]}
    assert (await _ask(http, pool.url, "broken"))[0] == 404
