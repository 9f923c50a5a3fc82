"""One provider's KV-event stream into the block index: a pyzmq asyncio SUB socket, vLLM's
replay socket for what the stream lost, and the provider's blocks dropped when its engine
restarted or its stream stopped.

Sockets. vLLM binds its PUB socket when the endpoint has `*`, `::` or is ipc/inproc, and
connects to it otherwise; the subscriber does the opposite: it connects (a `*` replaced by the
provider's host) or binds the endpoint itself (e.g. `tcp://127.0.0.1:5557` on the router's
host, which the engine connects to; then only one subscriber per endpoint can exist). The
replay endpoint is always bound by vLLM; a fresh DEALER per replay sends `(b"", start seq as 8
bytes big-endian)` and reads `(b"", topic, seq, payload)` frames (releases before 0.32 leave the
topic out) up to the end marker, seq -1.

Sequence numbers. Batches are numbered from 0 per engine process. A batch past the next expected
number means lost batches: they are replayed, the replay asked from the last batch applied. A
number already seen with a different payload, or a replay that does not start with the last batch
applied, means a new engine process: the provider's blocks are dropped and its stream is
replayed from 0 (as when the replay buffer rolled past that batch). A hole nothing can fill (no
replay socket, or no answer) after blocks were indexed drops the provider's blocks too (a lost
removal would leave blocks it no longer holds); a hole before anything was indexed only leaves
blocks unknown. An engine publishes only when its
cache changes, so silence is not death: after `silence_s` without a batch the replay socket is
asked from the last batch seen, which brings any batch the stream lost at its end and tells a
live engine (the same last batch) from a restarted one (another) or a gone one (no answer
within `replay_timeout_s`: its blocks are dropped until it publishes again). Without a replay
endpoint silence is left to the health checks (`forget` when the circuit opens).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio
from xxhash import xxh3_64_intdigest

from serve_app.core.config import KvEventsEndpoints
from serve_app.routing.kv.events import END_SEQ, EventBatch, decode_batch, decode_seq, encode_seq
from serve_app.routing.kv.index import BlockIndex

_RECENT = 256  # payload digests kept to tell a repeated batch from a restarted engine's
ERROR_PAUSE_S = 1.0  # after an unexpected error, so a lasting one does not spin the loop
log = logging.getLogger("ray.serve")


def engine_binds(endpoint: str) -> bool:
    """vLLM's rule for its PUB socket (ZmqEventPublisher._is_bind_endpoint)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def reachable(endpoint: str, host: str) -> str:
    """An endpoint vLLM binds, as another host connects to it."""
    return endpoint.replace("[::]", host).replace("*", host)


@dataclass
class SubscriberStats:
    batches: int = 0  # applied, live or replayed
    replayed: int = 0
    gaps: int = 0  # batches found missing, replay asked
    holes: int = 0  # batches lost for good after blocks were indexed
    restarts: int = 0
    silences: int = 0  # probes unanswered: blocks dropped
    decode_errors: int = 0
    errors: int = 0  # unexpected: the provider's blocks dropped


class Subscriber:
    """See the module doc. `start()` on the event loop that applies to `index`."""

    def __init__(
        self,
        provider: str,
        endpoints: KvEventsEndpoints,
        index: BlockIndex,
        host: str = "127.0.0.1",
        silence_s: float = 30.0,
        replay_timeout_s: float = 2.0,
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        """`on_lag(seconds)`: each live batch applied, from the engine's timestamp to now."""
        self.provider = provider
        self.on_lag = on_lag
        self.endpoints = endpoints
        self.index = index
        self.host = host
        self.silence_s = silence_s
        self.replay_timeout_s = replay_timeout_s
        self.stats = SubscriberStats()
        self.next_seq: int | None = None  # None: nothing applied since start, forget or silence
        self._recent: OrderedDict[int, int] = OrderedDict()  # seq -> payload digest
        self._ctx = zmq.asyncio.Context.instance()
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def binds(self) -> bool:
        """Whether this side binds the PUB endpoint (the engine connects to it)."""
        return not engine_binds(self.endpoints.endpoint)

    def start(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.endpoints.topic.encode())
        sub.setsockopt(zmq.RCVHWM, 100_000)
        endpoint = self.endpoints.endpoint
        if self.binds:
            sub.bind(endpoint)
        else:
            sub.connect(reachable(endpoint, self.host))
        self._sub = sub
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            self._sub.close(linger=0)

    def forget(self) -> None:
        """Drops the provider's blocks (its circuit opened); the stream starts afresh, from
        the replay's first batch, when it next publishes."""
        self.index.drop(self.provider)
        self.next_seq = None
        self._recent.clear()

    async def _run(self) -> None:
        assert self._sub is not None
        await self._probe()  # an engine up before us: learn what it already holds
        while True:
            try:
                if not await self._sub.poll(int(self.silence_s * 1000)):
                    await self._probe()
                    continue
                frames = await self._sub.recv_multipart()
                if len(frames) == 3:
                    await self._on_batch(decode_seq(frames[1]), frames[2])
            except Exception:  # the stream goes on; what it had applied may be wrong
                log.exception("KV events of provider %s: dropping its blocks", self.provider)
                self.stats.errors += 1
                self.forget()
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _on_batch(self, seq: int, payload: bytes) -> None:
        if self.next_seq is not None and seq < self.next_seq:
            if self._recent.get(seq) == xxh3_64_intdigest(payload):
                return  # already applied (a replay overtook the stream)
            self._restarted()
        if seq > (self.next_seq or 0):
            self.stats.gaps += 1
            await self._catch_up(upto=seq)
        batch = self._apply_next(seq, payload)
        if batch is not None and self.on_lag is not None:
            self.on_lag(max(0.0, time.time() - batch.ts))

    async def _probe(self) -> None:
        """The stream is quiet: whatever it lost at its end, or the provider's blocks dropped
        when the replay socket does not answer."""
        if not await self._catch_up() and self.next_seq is not None:
            self.stats.silences += 1
            self.forget()

    async def _catch_up(self, upto: int | None = None) -> bool:
        """Applies the replayed batches after the last one applied, up to `upto` (exclusive;
        None: all). The replay is asked from the last batch applied (from 0 before any): when
        it does not start with that batch, the engine restarted and is replayed from 0. False
        when there is no replay socket or it does not answer."""
        if self.endpoints.replay_endpoint is None:
            return False
        last = self.next_seq - 1 if self.next_seq else None
        batches = await self._replay(last or 0)
        if batches is not None and last is not None and not self._continues(last, batches):
            self._restarted()
            batches = await self._replay(0)
        if batches is None:
            return False
        for seq, payload in batches:
            if upto is not None and seq >= upto:
                break
            if self.next_seq is None or seq >= self.next_seq:
                self.stats.replayed += 1
                self._apply_next(seq, payload)
        return True

    def _continues(self, last: int, batches: list[tuple[int, bytes]]) -> bool:
        return (
            bool(batches)
            and batches[0][0] == last
            and (self._recent.get(last) == xxh3_64_intdigest(batches[0][1]))
        )

    def _restarted(self) -> None:
        self.stats.restarts += 1
        self.forget()

    def _apply_next(self, seq: int, payload: bytes) -> EventBatch | None:
        if self.next_seq is not None and seq != self.next_seq:
            self.stats.holes += 1
            self.index.drop(self.provider)
        self.next_seq = seq + 1
        self._recent[seq] = xxh3_64_intdigest(payload)
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError:
            self.stats.decode_errors += 1
            self.index.drop(self.provider)  # its events are lost: as a hole
            return None
        self.stats.batches += 1
        self.index.apply(self.provider, batch.events)
        return batch

    async def _replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """The replay socket's batches from `start` on; None when it stays silent for
        `replay_timeout_s` before its end marker (a long replay may take longer in all)."""
        assert self.endpoints.replay_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.connect(reachable(self.endpoints.replay_endpoint, self.host))
        out: list[tuple[int, bytes]] = []
        try:
            await dealer.send_multipart((b"", encode_seq(start)))
            while await dealer.poll(int(self.replay_timeout_s * 1000)):
                frames = await dealer.recv_multipart()
                seq = decode_seq(frames[-2])
                if seq == END_SEQ:
                    return out
                out.append((seq, frames[-1]))
            return None
        finally:
            dealer.close(linger=0)
