"""Run by tests/test_shared_routing.py in its own process: a three-node Ray cluster on one machine
(a head and two workers with custom resources). On each worker an actor takes first_available
slots through the broker, as a picker replica does, and calls fake upstreams with them (as the
ingress would, here in the same actor); then
the actor on one node is killed while it holds a slot. Prints what it saw as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time

import aiohttp
import ray
from ray.cluster_utils import Cluster

from serve_app.cluster.broker import Terms, broker_handle
from serve_app.cluster.registry.actor import RegistryRef
from serve_app.core.config import ProviderConfig
from serve_app.demo.upstream import FakeUpstream, Knobs
from serve_app.pickers.shared import SharedState

LEASE_S = 2.0
TERMS = Terms(lease_s=LEASE_S, pin_ttl_s=60.0, latency_alpha=0.3)


@ray.remote(num_cpus=0)
class Client:
    """A stand-in for a picker's slot and the ingress's upstream call: slot, call, release."""

    def __init__(self, registry: RegistryRef, name: str, providers: list[dict]) -> None:
        self._providers = [ProviderConfig.model_validate(p) for p in providers]
        self._shared = SharedState(lambda: broker_handle(registry), name)
        self._shared.configure([p.id for p in self._providers], ["m"], TERMS)
        self._started = False

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def _call(self, session: aiohttp.ClientSession) -> str:
        slot = await self._shared.acquire("m", "first_available", [self._providers], 30.0)
        assert slot is not None
        try:
            url = next(p.api_host for p in self._providers if p.id == slot.provider)
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
            return slot.provider
        finally:
            self._shared.release(slot)

    async def run(self, calls: int, concurrency: int) -> dict[str, int]:
        if not self._started:
            self._shared.start()
            self._started = True
        served: dict[str, int] = {}
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                for _ in range(calls // concurrency):
                    pid = await self._call(session)
                    served[pid] = served.get(pid, 0) + 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return served

    async def hold(self) -> str:
        """Takes a slot and keeps it (until this actor dies)."""
        slot = await self._shared.acquire("m", "first_available", [self._providers], 30.0)
        assert slot is not None
        return slot.provider


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for name in ("node_a", "node_b"):
        cluster.add_node(num_cpus=1, num_gpus=1, resources={name: 1})
    ray.init(address=cluster.address, logging_level="error", log_to_driver=False)
    cluster.wait_for_nodes()
    ups = [FakeUpstream(f"p{i}", Knobs(latency_s=0.03)) for i in (1, 2)]
    for up in ups:
        up.record = False
        up.start_in_thread()
    providers = [
        {"id": up.name, "api_host": up.url, "api_type": "openai", "input_size": 100} for up in ups
    ]
    registry = RegistryRef(
        name="multinode-registry",
        path=os.path.join(tempfile.mkdtemp(prefix="multinode-"), "registry.json"),
    )
    clients = {
        name: Client.options(resources={name: 0.1}).remote(registry, f"client-{name}", providers)
        for name in ("node_a", "node_b")
    }
    served = ray.get([c.run.remote(40, 4) for c in clients.values()])
    report: dict[str, object] = {
        "head": ray.get_runtime_context().get_node_id(),
        "nodes": ray.get([c.node.remote() for c in clients.values()]),
        "served": served,
        "peaks": {up.name: up.peak for up in ups},
    }
    broker = broker_handle(registry)
    held = ray.get(clients["node_b"].hold.remote())
    ray.get(clients["node_a"].hold.remote())  # the other provider: nothing is free now
    ray.kill(clients["node_b"], no_restart=True)
    killed = time.monotonic()
    while ray.get(broker.state.remote())["busy"].get(held):  # only its lease's expiry frees it
        assert time.monotonic() - killed < LEASE_S * 4 + 30, "the killed node's lease never expired"
        time.sleep(0.05)
    report["retaken"] = ray.get(clients["node_a"].hold.remote())
    report["held"] = held
    print(json.dumps(report))
    for up in ups:
        up.stop_thread()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
