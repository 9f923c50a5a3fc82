"""Health probes, shared circuits, deadlines, metrics and request ids on real Serve."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import ray

from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, deploy, provider, samples, until

pytestmark = pytest.mark.serve

TYPE = "health_models"


@dataclass
class Pool:
    url: str
    h1: FakeUpstream
    h2: FakeUpstream
    slow: FakeUpstream
    busy: FakeUpstream
    spare: FakeUpstream


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    h1, h2, slow = (upstream_factory(n) for n in ("h1", "h2", "slow-h"))
    busy, spare = (upstream_factory(n) for n in ("busy", "spare"))
    config = {
        TYPE: {
            "m/h": {"providers": [provider("h1", h1.url), provider("h2", h2.url, weight=0)]},
            "m/slow": {"providers": [provider("slow-h", slow.url)]},
        },
        "overload_models": {
            "m/busy": {
                "providers": [provider("busy", busy.url, max_concurrency=2)],
                "providers_sleep": [provider("spare", spare.url, max_concurrency=1)],
            }
        },
        "active_models": {TYPE: ["m/h", "m/slow"], "overload_models": ["m/busy"]},
        "routing": {
            TYPE: {
                "strategy": "weighted",  # h1 (h2 has weight 0) whenever it is in service
                "num_replicas": 2,
                "unhealthy_cooldown_s": 0,  # only the shared circuit keeps h1 aside
                "health_check_interval_s": 0.2,
                "health_check_timeout_s": 0.5,
                "circuit_failures": 2,
                "circuit_cooldown_s": 1.0,
                "request_timeout_s": 5,
            }
        },
    }
    deploy(serve_url, config)
    return Pool(serve_url, h1, h2, slow, busy, spare)


@pytest.fixture(autouse=True)
def _fresh(pool: Pool) -> None:
    for up in (pool.h1, pool.h2, pool.slow):
        up.knobs = Knobs()


async def _ask(
    http: aiohttp.ClientSession, url: str, model: str = "m/h", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return resp.status, headers, await resp.read()


async def _answers(http: aiohttp.ClientSession, pool: Pool, n: int) -> set[tuple[str, str]]:
    """(provider, attempts) of n answers, one at a time, all required to be 200."""
    results = [await _ask(http, pool.url) for _ in range(n)]
    assert {status for status, _, _ in results} == {200}
    return {(h["x-router-provider"], h["x-router-attempts"]) for _, h, _ in results}


async def test_a_dead_provider_is_taken_out_for_every_replica_and_put_back(
    pool: Pool, http
) -> None:
    assert await _answers(http, pool, 10) == {("h1", "1")}
    port = pool.h1.port
    pool.h1.stop_thread()
    try:

        async def out() -> bool:
            return ("h2", "1") in await _answers(http, pool, 4) and not any(
                attempts != "1" for _, attempts in await _answers(http, pool, 20)
            )

        # Once the probes open the circuit, no replica tries h1 first any more: 40 requests
        # over both replicas are answered by h2 on the first attempt.
        await until(out, "h1's circuit to open")
        assert await _answers(http, pool, 40) == {("h2", "1")}
    finally:
        pool.h1.start_in_thread(port=port)

    async def back() -> bool:
        return await _answers(http, pool, 10) == {("h1", "1")}

    await until(back, "h1 to be put back after its trial probe")


async def test_failing_requests_trip_the_circuit_even_when_probes_pass(pool: Pool, http) -> None:
    pool.h1.knobs = Knobs(fail_status=500)  # /v1/models still answers 200

    async def tripped() -> bool:
        return await _answers(http, pool, 20) == {("h2", "1")}

    await until(tripped, "requests to trip h1's circuit")
    calls = pool.h1.count("/v1/chat/completions")
    assert await _answers(http, pool, 30) == {("h2", "1")}
    assert pool.h1.count("/v1/chat/completions") == calls  # no request reached h1 meanwhile
    pool.h1.knobs = Knobs()

    async def back() -> bool:
        return ("h1", "1") in await _answers(http, pool, 10)

    await until(back, "h1 back after the cooldown")


async def test_at_the_concurrency_limit_sleeping_providers_then_429(pool: Pool, http) -> None:
    pool.busy.knobs = Knobs(hold=True)
    pool.spare.knobs = Knobs(hold=True)
    calls = [asyncio.ensure_future(_ask(http, pool.url, "m/busy")) for _ in range(5)]

    async def full() -> bool:  # every slot taken and held, the rest answered
        return (pool.busy.active, pool.spare.active, sum(c.done() for c in calls)) == (2, 1, 2)

    try:
        await until(full, "two calls on busy, one on spare, two refused")
    finally:
        pool.busy.release()
        pool.spare.release()
    results = await asyncio.gather(*calls)
    served = sorted(h["x-router-provider"] for status, h, _ in results if status == 200)
    assert served == ["busy", "busy", "spare"]
    refused = [(h, orjson.loads(body)) for status, h, body in results if status == 429]
    assert len(refused) == 2
    assert all(h["retry-after"] and b["error"]["code"] == "all_providers_busy" for h, b in refused)


async def test_a_deadline_ends_a_unary_request_with_504(pool: Pool, http) -> None:
    pool.slow.knobs = Knobs(latency_s=3)
    status, _, body = await _ask(http, pool.url, "m/slow", **{"x-request-timeout": "0.3"})
    assert status == 504 and orjson.loads(body)["error"]["code"] == "deadline_exceeded"
    status, _, body = await _ask(http, pool.url, "m/slow", **{"x-request-timeout": "soon"})
    assert status == 400 and b"x-request-timeout" in body


async def test_the_configured_deadline_applies_without_a_header(pool: Pool, http) -> None:
    pool.slow.knobs = Knobs(latency_s=6)
    status, _, body = await _ask(http, pool.url, "m/slow")
    assert status == 504 and b"within its 5 s deadline" in body


async def test_a_deadline_mid_stream_ends_with_an_error_event(pool: Pool, http) -> None:
    pool.slow.knobs = Knobs(chunks=20, chunk_delay_s=0.1)
    body = {"model": "m/slow", "stream": True, "messages": [{"role": "user", "content": "x" * 40}]}
    headers = {"x-request-timeout": "0.5"}
    async with http.post(f"{pool.url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
    last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    assert orjson.loads(last[6:])["error"]["code"] == "deadline_exceeded"
    assert "[DONE]" not in text


async def test_metrics_cover_requests_providers_latency_and_circuits(pool: Pool, http) -> None:
    pool.h2.knobs = Knobs()
    ttft_count = 'llm_router_time_to_first_token_seconds_count{model="m/h"}'
    failover_count = 'llm_router_failovers_total{model="m/h"}'
    # Earlier tests' requests count too.
    async with http.get(f"{pool.url}/metrics", headers=ADMIN) as resp:
        earlier = await resp.text()
    ttft_before = samples(earlier, "llm_router_time_to_first_token_seconds_count")
    failovers_before = samples(earlier, "llm_router_failovers_total")
    for _ in range(5):
        assert (await _ask(http, pool.url))[0] == 200
    pool.h1.knobs = Knobs(fail_status=503, fail_times=1)  # one failover, to h2
    status, headers, _ = await _ask(http, pool.url)
    assert (status, headers["x-router-provider"]) == (200, "h2")

    async def scraped() -> str:
        async with http.get(f"{pool.url}/metrics", headers=ADMIN) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/plain")
            return await resp.text()

    async def counted() -> bool:
        text = await scraped()
        ok = samples(text, "llm_router_upstream_attempts_total")
        failovers = samples(text, "llm_router_failovers_total")
        ttft = samples(text, "llm_router_time_to_first_token_seconds_count")
        return (
            ok.get('llm_router_upstream_attempts_total{outcome="ok",provider="h1"}', 0) >= 5
            and failovers.get(failover_count, 0) >= failovers_before.get(failover_count, 0) + 1
            and ttft.get(ttft_count, 0) >= ttft_before.get(ttft_count, 0) + 6
            # Every booking ends: plans the ingress made ahead and did not use are given back
            # within a push or two, so the gauge settles at 0 (a leaked booking never does).
            and 'llm_router_provider_in_flight{provider="h1"} 0.0' in text
        )

    await until(counted, "router replicas to push their totals")
    text = await scraped()
    requests = samples(text, "llm_router_requests_total")
    assert (
        requests['llm_router_requests_total{api="openai",model="m/h",provider="h1",status="200"}']
        >= 5
    )
    buckets = samples(text, "llm_router_request_duration_seconds_bucket")
    assert buckets['llm_router_request_duration_seconds_bucket{le="+Inf",model="m/h"}'] >= 5
    assert 'llm_router_circuit_state{provider="h2"} 0.0' in text
    assert 'llm_router_provider_probe_up{provider="h2"} 1.0' in text


async def test_the_request_id_is_returned_and_logged(pool: Pool, http) -> None:
    pool.h1.knobs = Knobs(fail_status=503, fail_times=1)
    status, headers, _ = await _ask(http, pool.url, **{"x-request-id": "client-id-4711"})
    assert status == 200 and headers["x-request-id"] == "client-id-4711"
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def logged() -> bool:
        for path in logs.glob("replica_*Ingress*.log"):  # the replica that calls upstreams
            for line in path.read_text(errors="replace").splitlines():
                if "client-id-4711" in line and "upstream attempt failed" in line:
                    record = json.loads(line)
                    return record["request_id"] == "client-id-4711" and record["provider"] == "h1"
        return False

    async def check() -> bool:
        return await asyncio.to_thread(logged)

    await until(check, "the failed attempt to be logged with the request id")
    assert re.fullmatch(r"[0-9a-f-]{8,}", (await _ask(http, pool.url))[1]["x-request-id"])
