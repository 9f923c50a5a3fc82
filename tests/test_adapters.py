"""LoRA adapters on real Serve: registration, routing to loaded versions, rolling updates."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
import ray

from serve_app.core.config import parse_config
from serve_app.core.metrics import Tally
from serve_app.core.schemas import Endpoint, validate_request
from serve_app.demo.upstream import FakeUpstream
from serve_app.ingress.outcomes import Reporter
from serve_app.ingress.relay import Deadline, Relay, Route, call_limits
from serve_app.pickers.handler import ModelHandler
from serve_app.pickers.picker import Picker
from serve_app.pickers.plan import Plan
from tests.conftest import ADMIN, REGISTRY, deploy, lora_dir, provider, wait_for

pytestmark = pytest.mark.serve

TYPE = "lora_models"


@dataclass
class Pool:
    url: str
    va: FakeUpstream
    vb: FakeUpstream
    vo: FakeUpstream
    config: dict


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
    return Pool(serve_url, va, vb, vo, config)


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
        http, pool.url, {"base_model": "m/base", "name": "sql", "source": lora_dir("sql-1")}
    )
    assert status == 201, answer
    assert answer["version"] == 1 and answer["unconfirmed_replicas"] == []
    assert {r["provider"]: r["status"] for r in answer["providers"]} == {
        "va": "loaded",
        "vb": "loaded",
    }
    assert pool.va.loras["sql@v1"] == pool.vb.loras["sql@v1"] == lora_dir("sql-1")

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


def _loaded(name: str) -> tuple[str, ...]:
    """The providers the registry routes the adapter's current version to."""
    adapter = ray.get(REGISTRY.handle().current.remote()).adapters.get(name)
    return () if adapter is None else adapter.current.loaded


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    await asyncio.to_thread(wait_for, predicate, timeout, what)


def _asked_before_loaded(up: FakeUpstream, lora: str, since: int = 0) -> list[int]:
    """Positions of requests for `lora` that reached `up` before its load of `lora` did."""
    load = next(
        (
            i
            for i, r in enumerate(up.requests[since:])
            if r.path == "/v1/load_lora_adapter" and r.body.get("lora_name") == lora
        ),
        None,
    )
    return [
        i
        for i, r in enumerate(up.requests[since:])
        if r.path == "/v1/chat/completions"
        and r.body.get("model") == lora
        and (load is None or i < load)
    ]


async def test_a_version_is_served_where_it_loaded_and_loaded_where_it_failed(
    pool: Pool, http
) -> None:
    pool.va.knobs.lora_fail_status = 500
    try:
        status, answer = await _register(
            http,
            pool.url,
            {"base_model": "m/base", "name": "partial", "source": lora_dir("partial")},
        )
        assert status == 201
        rows = {r["provider"]: r for r in answer["providers"]}
        assert rows["va"]["status"] == "failed" and "HTTP 500" in rows["va"]["detail"]
        results = await asyncio.gather(*(_ask(http, pool.url, "partial") for _ in range(20)))
        assert set(results) == {(200, "vb", "partial@v1")}
    finally:
        pool.va.knobs.lora_fail_status = None
    # The registry keeps trying where the load failed.
    await _until(lambda: "va" in _loaded("partial"), 15, "partial@v1 loaded on va")
    results = await asyncio.gather(*(_ask(http, pool.url, "partial") for _ in range(20)))
    assert "va" in {r[1] for r in results} and {r[0] for r in results} == {200}


async def test_a_restarted_server_gets_its_adapters_back_and_no_adapter_request_before(
    pool: Pool, http
) -> None:
    body = {"base_model": "m/base", "name": "back", "source": lora_dir("back")}
    assert (await _register(http, pool.url, body))[0] == 201
    results: list[tuple[int, str, str]] = []
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            results.append(await _ask(http, pool.url, "back"))

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    try:
        await asyncio.to_thread(pool.va.stop_thread)
        await _until(lambda: "va" not in _loaded("back"), 10, "the registry to see va gone")
        pool.va.knobs.lora_load_s = 1.0  # a window in which va answers but lacks the adapter
        mark = len(pool.va.requests)
        await asyncio.to_thread(pool.va.start_in_thread, pool.va.port)
        await _until(lambda: "va" in _loaded("back"), 60, "back@v1 loaded on va again")
        await _until(lambda: any(r[1] == "va" for r in results[-10:]), 10, "va serving back")
    finally:
        stop.set()
        await asyncio.gather(*workers)
        pool.va.knobs.lora_load_s = 0.0
    assert pool.va.loras["back@v1"] == body["source"]
    loads = [r.body for r in pool.va.requests[mark:] if r.path == "/v1/load_lora_adapter"]
    assert [b["lora_name"] for b in loads].count("back@v1") == 1
    assert {r[0] for r in results} == {200} and {r[2] for r in results} == {"back@v1"}
    assert _asked_before_loaded(pool.va, "back@v1", mark) == []


async def test_an_adapter_loaded_nowhere_answers_503_then_comes_back(pool: Pool, http) -> None:
    body = {"base_model": "m/base", "name": "lonely", "source": lora_dir("lonely")}
    assert (await _register(http, pool.url, body))[0] == 201
    pool.va.knobs.lora_fail_status = pool.vb.knobs.lora_fail_status = 500
    try:
        # Both servers forget it (as after a restart) and cannot load it for now.
        del pool.va.loras["lonely@v1"], pool.vb.loras["lonely@v1"]
        await _until(lambda: _loaded("lonely") == (), 10, "the registry to see it gone")
        req = {"model": "lonely", "messages": [{"role": "user", "content": "q"}]}
        async with http.post(f"{pool.url}/v1/chat/completions", json=req) as resp:
            error = (await resp.json())["error"]
            assert (resp.status, error["code"]) == (503, "adapter_unavailable")
            assert resp.headers["retry-after"] == "2"
    finally:
        pool.va.knobs.lora_fail_status = pool.vb.knobs.lora_fail_status = None
    await _until(lambda: len(_loaded("lonely")) == 2, 15, "lonely loaded again")
    # The replicas follow the registry's manifest by long-poll: until each has the new one it
    # still answers 503 (with Retry-After), never anything else, and then serves the adapter.
    answers: list[tuple[int, str]] = []
    deadline = time.monotonic() + 10
    while not answers or answers[-1][0] != 200:
        assert time.monotonic() < deadline, answers
        async with http.post(f"{pool.url}/v1/chat/completions", json=req) as resp:
            doc = await resp.json()
            answers.append((resp.status, doc.get("model") or doc["error"]["code"]))
    assert set(answers[:-1]) <= {(503, "adapter_unavailable")}
    assert answers[-1] == (200, "lonely@v1")


async def test_a_provider_added_by_a_reload_gets_the_adapters_first(
    pool: Pool, http, upstream_factory
) -> None:
    body = {"base_model": "m/base", "name": "late", "source": lora_dir("late")}
    assert (await _register(http, pool.url, body))[0] == 201
    vc = upstream_factory("vc")
    vc.knobs.lora_load_s = 1.0
    grown = copy.deepcopy(pool.config)
    grown[TYPE]["m/base"]["providers"].append(provider("vc", vc.url, "vllm"))
    registry = REGISTRY.handle()
    try:
        version = ray.get(registry.publish_config.remote(grown, "test-config")).version
        assert ray.get(registry.wait_for_followers.remote(version, 10)) == []
        # Until it has loaded the adapter, vc serves the base model but not the adapter.
        asked = await asyncio.gather(*(_ask(http, pool.url, "late") for _ in range(20)))
        assert {r[0] for r in asked} == {200}
        await _until(lambda: "vc" in _loaded("late"), 10, "late@v1 loaded on vc")
        asked = await asyncio.gather(*(_ask(http, pool.url, "late") for _ in range(20)))
        assert "vc" in {r[1] for r in asked} and {r[0] for r in asked} == {200}
    finally:
        ray.get(registry.publish_config.remote(pool.config, "test-config"))
    # Every adapter of its base model (the session's registry also holds other modules' ones).
    current = ray.get(registry.current.remote()).adapters
    ours = {n: a for n, a in current.items() if a.base_model == "m/base"}
    assert vc.loras == {f"{n}@v{a.current.version}": a.current.source for n, a in ours.items()}
    assert _asked_before_loaded(vc, "late@v1") == []


async def _delete(
    http: aiohttp.ClientSession, url: str, name: str, headers=ADMIN
) -> tuple[int, dict]:
    async with http.delete(f"{url}/api/v1/adapters/{name}", headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_deleted_adapter_answers_404_and_is_unloaded_once_unused(pool: Pool, http) -> None:
    body = {"base_model": "m/base", "name": "gone", "source": lora_dir("gone")}
    assert (await _register(http, pool.url, body))[0] == 201
    pool.va.knobs.hold = pool.vb.knobs.hold = True  # the request on it stays until released
    try:
        slow = asyncio.create_task(_ask(http, pool.url, "gone"))
        await _until(lambda: pool.va.active + pool.vb.active == 1, 10, "a request on gone")
        status, answer = await _delete(http, pool.url, "gone")
        assert status == 200 and answer["unloading"] == ["gone@v1"], answer
        assert answer["unconfirmed_replicas"] == []
        assert (await _ask(http, pool.url, "gone"))[0] == 404
        # Still loaded while a request uses it.
        assert "gone@v1" in pool.va.loras and "gone@v1" in pool.vb.loras
    finally:
        pool.va.release()
        pool.vb.release()
    assert (await slow)[0] == 200
    for up in (pool.va, pool.vb):
        await _until(lambda up=up: "gone@v1" not in up.loras, 15, f"gone@v1 unloaded on {up.name}")
    async with http.get(f"{pool.url}/api/v1/adapters", headers=ADMIN) as resp:
        assert "gone" not in {a["name"] for a in (await resp.json())["data"]}
    assert (await _delete(http, pool.url, "gone"))[1]["error"]["code"] == "adapter_not_found"
    assert (await _delete(http, pool.url, "gone", {}))[0] == 401


async def test_a_rolling_update_under_load_fails_nothing_and_serves_nothing_stale(
    pool: Pool, http
) -> None:
    body = {"base_model": "m/base", "name": "roll", "source": lora_dir("roll-1")}
    assert (await _register(http, pool.url, body))[0] == 201
    before, after_ack, workers = 130, 50, 8
    done: list[tuple[float, int, str]] = []
    halfway = asyncio.Event()
    acked_at: list[float] = []

    def enough() -> bool:  # requests sent after the update's acknowledgement, however long it took
        return bool(acked_at) and sum(1 for d in done if d[0] > acked_at[0]) >= after_ack

    async def worker() -> None:
        while not enough():
            assert len(done) < 20_000, "the update was never acknowledged"
            sent = time.monotonic()
            status, _, served = await _ask(http, pool.url, "roll")
            done.append((sent, status, served))
            if len(done) >= before:
                halfway.set()

    async def update() -> None:
        await halfway.wait()
        status, answer = await _register(http, pool.url, {**body, "source": lora_dir("roll-2")})
        acked_at.append(time.monotonic())
        assert status == 201 and answer["unconfirmed_replicas"] == [], answer

    await asyncio.gather(update(), *(worker() for _ in range(workers)))
    assert [d for d in done if d[1] != 200] == []
    after = [served for sent, _, served in done if sent > acked_at[0]]
    assert set(after) == {"roll@v2"}
    assert {served for _, _, served in done} == {"roll@v1", "roll@v2"}

    for up in (pool.va, pool.vb):
        await asyncio.to_thread(
            wait_for, lambda up=up: "roll@v1" not in up.loras, 15, "roll@v1 unloaded"
        )
        assert up.loras["roll@v2"] == lora_dir("roll-2")
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
            http, pool.url, {"base_model": "m/base", "name": "broken", "source": lora_dir("broken")}
        )
    finally:
        pool.va.knobs.lora_fail_status = pool.vb.knobs.lora_fail_status = None
    assert status == 502 and answer["error"]["code"] == "adapter_load_failed"
    assert "va: HTTP 503" in answer["error"]["message"]
    async with http.get(f"{pool.url}/api/v1/adapters", headers=ADMIN) as resp:
        assert "broken" not in {a["name"] for a in (await resp.json())["data"]}
    assert (await _ask(http, pool.url, "broken"))[0] == 404


async def test_a_version_every_server_lost_answers_503_from_a_router_not_yet_told(
    upstream_factory,
) -> None:
    """A router still routing to servers that restarted a moment ago (the registry has not seen
    it yet): each answers 404 for the version, and the client is told to retry, not 404."""
    va, vb = upstream_factory("lost-a"), upstream_factory("lost-b")
    route = {"model_path": "gone@v1"}
    config = parse_config(
        {
            TYPE: {
                "gone": {"providers": [provider(u.name, u.url, "vllm", **route) for u in (va, vb)]}
            },
            "active_models": {TYPE: ["gone"]},
        },
        "test",
    )
    body = b'{"model": "gone", "messages": [{"role": "user", "content": "q"}]}'
    meta = validate_request(Endpoint.CHAT, body, "r1")
    routing = config.model_types[TYPE].routing
    picker = Picker("p", ModelHandler(config=config), routing)
    plan = await picker.plan(meta, ())

    async def nowhere(key: object, report: object) -> None:
        raise AssertionError("not started: nothing is sent")

    class InProcess:  # the picker in this process, as the relay sees a picker deployment
        model_type = TYPE

        async def next(self, plan: Plan) -> Plan:
            return await picker.next(plan.plan_id)

        def failed(self, model: str, provider: str) -> None:
            pass

    async with aiohttp.ClientSession() as session:
        relay = Relay(session, Reporter("i", nowhere), Tally())
        deadline = Deadline.within(routing.request_timeout_s)
        route = Route(plan, InProcess(), call_limits(routing))
        answer = await relay.call(route, body, meta, deadline)
    assert answer.head.status == 503 and answer.head.headers["retry-after"] == "2"
    assert orjson.loads(answer.body)["error"]["code"] == "adapter_unavailable"
    assert [r.body["model"] for r in va.requests + vb.requests] == ["gone@v1", "gone@v1"]
