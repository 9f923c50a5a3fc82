"""Serve autoscaling of the ingress and of a model type's router, on real Serve: load raises
both to their maximum, a trickle brings both back to their minimum, and no request fails
meanwhile, streams included (each must end with [DONE]); a stream that began before the first
replica stopped ends after, whole."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from ray import serve
from ray.serve._private.common import ReplicaState

from serve_app.app import APP_NAME, router_deployment_name
from serve_app.demo.upstream import Knobs
from tests.conftest import deploy, provider, until

pytestmark = pytest.mark.serve

TYPE = "auto_models"
# Quick decisions for a test: Serve's defaults wait 30 s to scale up and 10 min to scale down.
SCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0,
    "downscale_delay_s": 1,
    "look_back_period_s": 1,
    "metrics_interval_s": 0.5,
}


def _running() -> dict[str, int]:
    app = serve.status().applications[APP_NAME]
    return {
        name: d.replica_states.get(ReplicaState.RUNNING, 0) for name, d in app.deployments.items()
    }


async def test_load_scales_ingress_and_router_up_and_idle_down_with_nothing_failing(
    serve_url: str, upstream_factory, http: aiohttp.ClientSession
) -> None:
    upstream = upstream_factory("auto")
    upstream.knobs = Knobs(latency_s=0.2, chunk_delay_s=0.05, chunks=4)
    span = upstream_factory("auto-span")  # its streams wait after their first chunk
    span.knobs = Knobs(chunks=4, hold_mid_stream=True)
    # The pickers' load is their plan calls: a slot strategy's calls wait there for a slot
    # (two at a time per provider), so twelve clients keep about ten calls in each picker.
    config = {
        TYPE: {
            "m/auto": {"providers": [provider("auto-1", upstream.url, nworkers=2)]},
            "m/span": {"providers": [provider("auto-span", span.url, nworkers=2)]},
        },
        "active_models": {TYPE: ["m/auto", "m/span"]},
        "routing": {
            TYPE: {
                "autoscaling": SCALING,
                "drain_timeout_s": 30,
                "strategy": "first_available_optim_nworkers",
                "wait_timeout_s": 60,
            }
        },
    }
    deploy(serve_url, config, ingress_autoscaling=SCALING)
    router, ingress = router_deployment_name(TYPE), "Ingress"
    assert _running() == {ingress: 1, router: 1}

    failures: list[str] = []
    done = {"unary": 0, "stream": 0}

    async def client(stream: bool, stop: asyncio.Event) -> None:
        body = {"model": "m/auto", "messages": [{"role": "user", "content": "x"}]}
        while not stop.is_set():
            async with http.post(
                f"{serve_url}/v1/chat/completions", json={**body, "stream": stream}
            ) as resp:
                data = await resp.read()
            if resp.status != 200 or (stream and not data.rstrip().endswith(b"data: [DONE]")):
                failures.append(f"{resp.status} {data[-200:]!r}")
            done["stream" if stream else "unary"] += 1

    async def moved_since(before: dict[str, int], *kinds: str) -> bool:
        """Requests of each kind completed since `before`."""
        return all(done[kind] > before[kind] for kind in kinds or done)

    async def scaled_to(count: int) -> bool:
        return _running() == {ingress: count, router: count}

    begun = 0

    async def spanning() -> bytes:
        nonlocal begun
        body = {"model": "m/span", "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with http.post(f"{serve_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            first = await resp.content.readany()
            begun += 1
            return first + await resp.read()

    async def all_begun() -> bool:
        return begun == 2

    async def stopping() -> bool:
        app = serve.status().applications[APP_NAME]
        states = [d.replica_states for d in app.deployments.values()]
        return any(s.get(ReplicaState.STOPPING, 0) for s in states) or not await scaled_to(2)

    heavy = asyncio.Event()
    clients = [asyncio.create_task(client(i % 2 == 0, heavy)) for i in range(12)]
    held: list[asyncio.Task[bytes]] = []
    try:
        await until(lambda: scaled_to(2), "both deployments at 2 replicas under load", 90)
        # Requests completed on one replica and while it scaled up; they go on completing on two.
        grown = dict(done)
        assert grown["unary"] and grown["stream"], grown
        await until(lambda: moved_since(grown), "requests completing on 2 replicas", 60)
        # Two streams, held after their first chunk, span the first replicas' stop: they begin
        # while both deployments run 2 replicas (spread over them by Serve, most likely one
        # on the replica that stops), and are let go once one is stopping (a stopping replica
        # drains what it carries). Two in flight still let the deployments shrink to one.
        held += [asyncio.create_task(spanning()) for _ in range(2)]
        await until(all_begun, "both held streams' first bytes")
        assert await scaled_to(2)
    finally:
        heavy.set()
        await asyncio.gather(*clients)
    try:
        await until(stopping, "a replica to begin stopping", 90)
        assert not any(h.done() for h in held)
    finally:
        span.release()
    for answer in await asyncio.gather(*held):
        assert answer.rstrip().endswith(b"data: [DONE]")
    assert failures == [], failures[:5]
    light = asyncio.Event()
    trickle = asyncio.create_task(client(True, light))  # one stream at a time while it shrinks
    try:
        await until(lambda: scaled_to(1), "both deployments back at 1 replica", 90)
        shrunk = dict(done)
        await until(lambda: moved_since(shrunk, "stream"), "a stream completing on 1 replica", 60)
    finally:
        light.set()
        await trickle
    assert failures == [], failures[:5]
