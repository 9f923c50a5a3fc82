"""A provider's KV-event stream into the index (serve_app/routing/kv/subscriber), against the
simulated vLLM's publisher (vLLM's PUB and replay sockets) over loopback ZMQ: stores and
removals arrive, lost batches are replayed, a restarted or silent engine's blocks are dropped."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from serve_app.core.config import KvEventsEndpoints
from serve_app.demo.vllm_sim.publisher import KVEventsConfig, ZmqPublisher
from serve_app.routing.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, Event
from serve_app.routing.kv.index import BlockIndex
from serve_app.routing.kv.subscriber import Subscriber, engine_binds, reachable
from serve_app.routing.kv.tokens import prompt_keys
from tests.conftest import free_port

BS = 4


def _store(first: int, parent: int | None = None) -> BlockStored:
    """Block `first` (its tokens first*4 ..), engine hash 1000 + first."""
    tokens = list(range(first * BS, (first + 1) * BS))
    return BlockStored([1000 + first], parent, tokens, BS, None, "GPU", None)


def _held(index: BlockIndex) -> int:
    """How many leading blocks of the prompt 0, 1, 2, ... the provider holds."""
    return index.match(prompt_keys(list(range(64)), BS)).get("p", 0)


async def _until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


class Engine:
    """The simulator's publisher under a vLLM config whose endpoint makes it connect to the
    subscriber (no `*`), with its replay socket bound on loopback."""

    def __init__(self, port: int, replay_port: int) -> None:
        self.config = KVEventsConfig(
            enable_kv_cache_events=True,
            endpoint=f"tcp://127.0.0.1:{port}",
            replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
            topic="kv",
        )
        self.publisher = ZmqPublisher(self.config)

    def publish(self, *events: Event) -> None:
        self.publisher.publish(list(events))

    def lose(self, *events: Event) -> None:
        """A batch numbered and kept for replay but never sent (as past the PUB's mark)."""

        class Deaf:
            def send_multipart(self, *_: object, **__: object) -> None:
                return None

        pub, self.publisher._pub = self.publisher._pub, Deaf()  # type: ignore[assignment]
        try:
            self.publish(*events)
        finally:
            self.publisher._pub = pub

    async def stop(self) -> None:
        """Closes the sockets; ZMQ lets the replay port go a moment later."""
        await self.publisher.close()
        port = int(self.config.replay_endpoint.rpartition(":")[2])  # type: ignore[union-attr]

        def free() -> bool:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    return False
            return True

        await _until(free, "the replay port let go")

    async def restart(self) -> None:
        await self.stop()
        self.publisher = ZmqPublisher(self.config)


@contextlib.asynccontextmanager
async def _running(silence_s: float) -> AsyncIterator[tuple[Engine, Subscriber, BlockIndex]]:
    engine = Engine(free_port(), free_port())
    index = BlockIndex()
    endpoints = KvEventsEndpoints(
        endpoint=engine.config.endpoint, replay_endpoint=engine.config.replay_endpoint, topic="kv"
    )
    subscriber = Subscriber("p", endpoints, index, silence_s=silence_s, replay_timeout_s=0.5)
    subscriber.start()
    try:
        yield engine, subscriber, index
    finally:
        await subscriber.close()
        await engine.publisher.close()


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Engine, Subscriber, BlockIndex]]:
    async with _running(silence_s=0.3) as running:
        yield running


async def _connected(engine: Engine, subscriber: Subscriber) -> None:
    """Until the engine's connection is up its batches are lost (and replayed): empty batches
    until one arrives live."""
    live = subscriber.stats.batches - subscriber.stats.replayed

    def arrived() -> bool:
        engine.publish()
        return subscriber.stats.batches - subscriber.stats.replayed > live

    await _until(arrived, "a live batch")


async def test_stores_and_removals_reach_the_index_and_the_subscriber_binds(setup) -> None:
    engine, subscriber, index = setup
    assert subscriber.binds  # the endpoint has no `*`: vLLM connects, the router binds
    engine.publish(_store(0), _store(1, parent=1000), _store(2, parent=1001))
    await _until(lambda: _held(index) == 3, "three blocks held")
    engine.publish(BlockRemoved([1001], "GPU"))
    await _until(lambda: _held(index) == 1, "block 1 removed")
    engine.publish(AllBlocksCleared())
    await _until(lambda: index.total == 0, "cleared")


async def test_a_lost_batch_is_replayed_before_the_next_one_is_applied(setup) -> None:
    engine, subscriber, index = setup
    await _connected(engine, subscriber)
    gaps = subscriber.stats.gaps
    engine.publish(_store(0))
    engine.lose(_store(1, parent=1000))
    engine.publish(_store(2, parent=1001))  # its parent is known only through the replay
    await _until(lambda: _held(index) == 3, "the lost batch replayed")
    assert subscriber.stats.gaps == gaps + 1
    assert subscriber.stats.holes == 0 and index.skipped["p"] == 0


async def test_a_batch_lost_at_the_end_is_replayed_when_the_stream_goes_quiet(setup) -> None:
    engine, subscriber, index = setup
    await _connected(engine, subscriber)
    engine.publish(_store(0))
    engine.lose(_store(1, parent=1000))
    await _until(lambda: _held(index) == 2, "the last batch replayed")
    assert subscriber.stats.silences == 0


@pytest.mark.parametrize("behind", [True, False])
async def test_a_restarted_engine_drops_the_blocks_of_the_old_one(behind: bool) -> None:
    """Told by the stream alone (the stream never goes quiet here): the new engine's numbers
    are behind the old one's (seen before, other payloads), or past them (the replay from the
    last batch applied does not start with it)."""
    async with _running(silence_s=60) as (engine, subscriber, index):
        await _connected(engine, subscriber)
        engine.publish(_store(0), _store(1, parent=1000))
        for _ in range(50):
            engine.publish()
        await _until(lambda: (subscriber.next_seq or 0) > 50, "the old engine's numbers")
        assert _held(index) == 2
        old_next = subscriber.next_seq or 0
        await engine.restart()  # numbering starts again from 0; nothing of the old cache left
        engine.publish(BlockStored([7], None, [9, 9, 9, 9], BS, None, "GPU", None))
        for _ in range(0 if behind else old_next + 5):
            engine.lose()
        await _connected(engine, subscriber)
        assert _held(index) == 0 and index.total == 1  # the new engine's block alone
        assert subscriber.stats.restarts == 1


async def test_a_silent_engine_is_dropped_and_picked_up_again_when_it_is_back(setup) -> None:
    engine, subscriber, index = setup
    await _connected(engine, subscriber)
    engine.publish(_store(0))
    await _until(lambda: _held(index) == 1, "one block held")
    probes = subscriber.stats.replayed
    engine.lose()  # an idle engine answers the probe (here with one more batch): blocks stay
    await _until(lambda: subscriber.stats.replayed > probes, "a probe answered")
    assert _held(index) == 1
    await engine.stop()
    await _until(lambda: index.total == 0, "the silent engine's blocks dropped")
    assert subscriber.stats.silences == 1
    await engine.restart()
    engine.publish(_store(0))
    await _until(lambda: _held(index) == 1, "the engine back")


async def test_an_unexpected_error_drops_the_providers_blocks_and_the_stream_goes_on(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, subscriber, index = setup
    monkeypatch.setattr("serve_app.routing.kv.subscriber.ERROR_PAUSE_S", 0.0)
    await _connected(engine, subscriber)
    engine.publish(_store(0))
    await _until(lambda: _held(index) == 1, "one block held")
    apply = index.apply

    def broken(provider: str, events: list[Event]) -> None:
        index.apply = apply  # type: ignore[method-assign]
        raise RuntimeError("a bug")

    index.apply = broken  # type: ignore[method-assign]
    engine.publish(_store(1, parent=1000))
    await _until(lambda: subscriber.stats.errors == 1, "the error caught")
    assert index.total == 0
    engine.publish()  # the next batch: the stream is replayed from 0, the failed batch with it
    await _until(lambda: _held(index) == 2, "the stream going on")


def test_the_router_binds_what_vllm_connects_to_and_connects_to_what_it_binds() -> None:
    assert not engine_binds("tcp://10.0.0.5:5557")  # vLLM connects: the router binds it
    assert engine_binds("tcp://*:5557") and engine_binds("ipc:///tmp/kv")
    assert reachable("tcp://*:5557", "10.0.0.7") == "tcp://10.0.0.7:5557"
    assert reachable("tcp://[::]:5558", "10.0.0.7") == "tcp://10.0.0.7:5558"


async def test_each_live_batch_reports_its_lag_and_replayed_ones_do_not(setup) -> None:
    """The lag of a live batch: from the engine's timestamp to its application (here, on one
    host, well under a second); batches that come through the replay are not live."""
    engine, subscriber, _ = setup
    lags: list[float] = []
    subscriber.on_lag = lags.append
    await _connected(engine, subscriber)
    live = subscriber.stats.batches - subscriber.stats.replayed
    assert 0 < len(lags) <= live
    assert all(0.0 <= lag < 5.0 for lag in lags), lags
