"""A picker replica's view of what its engines hold: one block index fed by a subscriber per
engine that providers name in `kv_events` (routing/kv), for kv_aware.

Each picker replica subscribes on its own (vLLM's PUB socket takes any number of subscribers):
the decision reads the index in-process, with no hop per request, and a replica that dies
takes nothing with it but its copy. The cost is one copy of the index and one socket per
provider in every replica of the model type (docs/routing-kv.md). Providers whose engine
connects to the router instead (an endpoint without `*`) can have one subscriber only: the
replica that binds first holds it, the others log the clash and route by load alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit

import zmq

from serve_app.core.config import KvEventsEndpoints, ProviderConfig
from serve_app.routing.kv.events import MEDIUM_GPU
from serve_app.routing.kv.index import BlockIndex
from serve_app.routing.kv.subscriber import Subscriber, SubscriberStats, reachable

log = logging.getLogger("ray.serve")


class KvFeeds:
    """The index and its subscribers, one per engine: providers that name the same events (the
    models a vLLM serves, its LoRA adapters) share one stream and one set of blocks.
    `configure` follows the config, `forget` the circuits."""

    def __init__(self, lagged: Callable[[str, float], None] | None = None) -> None:
        """`lagged(provider, seconds)`: a live batch of the provider's engine applied, that
        long after the engine stamped it (for each provider sharing the engine)."""
        self.index = BlockIndex()
        self._lagged = lagged
        self._subscribers: dict[str, Subscriber] = {}  # by engine: its reachable endpoint
        self._engine_of: dict[str, str] = {}  # provider -> engine
        self._closing: set[asyncio.Task[None]] = set()

    def configure(self, providers: Sequence[ProviderConfig]) -> None:
        """Subscribes to the engines that are new, stops the others (their blocks dropped).
        Runs on the replica's event loop."""
        wanted: dict[str, tuple[KvEventsEndpoints, str]] = {}
        engine_of = {}
        for p in providers:
            if p.kv_events is not None:
                host = urlsplit(p.api_host).hostname or "127.0.0.1"
                engine = reachable(p.kv_events.endpoint, host)
                wanted.setdefault(engine, (p.kv_events, host))
                engine_of[p.id] = engine
        for engine, sub in list(self._subscribers.items()):
            if wanted.get(engine) != (sub.endpoints, sub.host):
                self._stop(engine)
        for engine, (endpoints, host) in wanted.items():
            if engine in self._subscribers:
                continue
            sub = Subscriber(engine, endpoints, self.index, host, on_lag=self._lag_of(engine))
            try:
                sub.start()
            except zmq.ZMQError as exc:  # e.g. another replica already binds this endpoint
                log.warning(
                    "kv events not subscribed",
                    extra={"engine": engine, "reason": f"{type(exc).__name__}: {exc}"},
                )
                continue
            self._subscribers[engine] = sub
        self._engine_of = {p: e for p, e in engine_of.items() if e in self._subscribers}

    def _lag_of(self, engine: str) -> Callable[[float], None] | None:
        lagged = self._lagged
        if lagged is None:
            return None

        def on_lag(seconds: float) -> None:
            for pid, e in self._engine_of.items():
                if e == engine:
                    lagged(pid, seconds)

        return on_lag

    def _stop(self, engine: str) -> None:
        sub = self._subscribers.pop(engine)
        self.index.drop(engine)
        task = asyncio.get_running_loop().create_task(sub.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def forget(self, pid: str) -> None:
        """The provider's engine's blocks dropped (its circuit opened); relearned from its next
        events."""
        sub = self._subscribers.get(self._engine_of.get(pid, ""))
        if sub is not None:
            sub.forget()

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Per provider, the leading blocks of `keys` its engine holds (on the GPU)."""
        held = self.index.match(keys)
        if not held:
            return {}
        return {p: held[e] for p, e in self._engine_of.items() if e in held}

    def per_provider(self) -> Iterator[tuple[str, int, SubscriberStats]]:
        """Each provider with events: its engine's blocks (GPU) and stream counts."""
        counts = self.index.counts()
        for pid, engine in self._engine_of.items():
            blocks = counts.get(engine, {}).get(MEDIUM_GPU, 0)
            yield pid, blocks, self._subscribers[engine].stats
