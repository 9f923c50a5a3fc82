"""A picker replica's local copy of the shared state (serve_app/pickers/shared.py) against a
real broker actor: counts seen by every replica, idle slots reused without a call only while a
replica is alone."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from serve_app.cluster.broker import Terms, broker_handle
from serve_app.cluster.registry.actor import RegistryRef
from serve_app.core.config import ProviderConfig
from serve_app.pickers.shared import SharedState
from serve_app.routing.strategies import Balanced
from tests.conftest import REGISTRY

TERMS = Terms(lease_s=5.0, pin_ttl_s=60.0, latency_alpha=0.5)
PROVIDERS = [
    ProviderConfig.model_validate(
        {"id": f"s{i}", "api_host": f"http://127.0.0.1:{i + 1}", "api_type": "openai"}
        | {"input_size": 10}
    )
    for i in range(3)
]


@pytest.fixture
def registry(serve_url: str) -> RegistryRef:
    """A broker of its own (its name follows the registry's), so no other test's slots mix in."""
    return REGISTRY.model_copy(update={"name": f"shared-{uuid.uuid4().hex[:8]}"})


def replica(registry: RegistryRef, name: str) -> SharedState:
    shared = SharedState(lambda: broker_handle(registry), name)
    shared.configure([p.id for p in PROVIDERS], ["m"], TERMS)
    shared.start()
    return shared


def takes(shared: SharedState) -> dict[str, float]:
    return {labels[0]: n for (_, labels), n in shared.tally.snapshot().values.items()}


async def until(check, what: str, timeout: float = 10.0) -> None:
    """Waits for `check()` (a bool, or an awaitable of one) to hold."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (await ok if asyncio.iscoroutine(ok := check()) else ok):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def broker_busy(registry: RegistryRef) -> dict[str, int]:
    return (await broker_handle(registry).state.remote())["busy"]


async def test_use_counts_and_latency_reach_every_replica(registry: RegistryRef) -> None:
    a, b = replica(registry, "a"), replica(registry, "b")
    try:
        for _ in range(3):
            a.used("m", "s0")
        a.used("m", "s1")
        a.took("s1", 0.2)
        # b has nothing of its own to send; its renewals still bring a's counts
        await until(lambda: b.stats("m", {}).uses == {"s0": 3, "s1": 1}, "b to see a's counts")
        assert [p.id for p in Balanced().order(PROVIDERS, b.stats("m", {}))] == ["s2", "s1", "s0"]
        await until(lambda: b.snapshot.latency.get("s1") == pytest.approx(0.2), "latency")
        await asyncio.sleep(0.6)  # more syncs without news must not drop what b saw
        assert b.stats("m", {}).uses == {"s0": 3, "s1": 1}
    finally:
        await a.stop()
        await b.stop()


async def test_idle_slots_are_reused_only_while_alone(registry: RegistryRef) -> None:
    a, b = replica(registry, "a"), replica(registry, "b")
    try:
        slot = await a.acquire("m", "first_available", [PROVIDERS], 5.0)
        assert slot is not None and slot.provider == "s0"
        a.release(slot)
        again = await a.acquire("m", "first_available", [PROVIDERS], 5.0)
        assert again == slot  # kept idle for a moment, taken back without a call
        assert takes(a) == {"broker": 1, "local": 1}
        # b competes: s0 is a's, so b gets s1; a learns it at its next renewal
        other = await b.acquire("m", "first_available", [PROVIDERS], 5.0)
        assert other is not None and other.provider == "s1"
        await until(lambda: not a.snapshot.alone, "a to learn that b takes slots too")
        a.release(again)  # from now on straight back to the broker

        async def only_b_holds() -> bool:
            return await broker_busy(registry) == {"s1": 1}

        await until(only_b_holds, "a's slot to be back")
        probe = await a.acquire("m", "first_available", [PROVIDERS], 5.0)
        assert probe is not None and probe.provider == "s0"
        assert takes(a) == {"broker": 2, "local": 1}
        a.release(probe)
        b.release(other)
    finally:
        await a.stop()
        await b.stop()


async def test_a_waiting_request_gets_the_first_slot_that_frees(registry: RegistryRef) -> None:
    a, b = replica(registry, "a"), replica(registry, "b")
    one = [PROVIDERS[0]]
    try:
        held = await a.acquire("m", "first_available", [one], 5.0)
        assert held is not None
        waiting = asyncio.ensure_future(b.acquire("m", "first_available", [one], 5.0))

        async def b_waits() -> bool:
            return (await broker_handle(registry).state.remote())["waiters"] == 1

        await until(b_waits, "b to wait at the broker")
        a.release(held)  # kept idle at most a moment, then the broker hands it to b
        got = await asyncio.wait_for(waiting, 5.0)
        assert got is not None and got.provider == "s0"
        assert await b.acquire("m", "first_available", [one], 0.3) is None  # busy past the wait
        assert takes(b)["timeout"] == 1
    finally:
        await a.stop()
        await b.stop()
