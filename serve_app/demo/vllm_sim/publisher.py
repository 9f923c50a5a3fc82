"""KV events out as vLLM's `ZmqEventPublisher` sends them, on the caller's asyncio loop.

PUB frames `(topic, seq as 8-byte big-endian, msgpack EventBatch)`; the last `buffer_steps`
batches kept for a ROUTER replay socket: a request `(identity, b"", start seq)` is answered by
every buffered batch from that number on in the same three frames as the PUB's, then
`(b"", -1, b"")` (vLLM 0.32's replay; earlier releases left the topic out). As in vLLM, an
endpoint with `*`, `::` or `ipc://` is bound and any other connected to (the subscriber binds,
e.g. on 127.0.0.1); unlike vLLM, a `*` is bound on the server's own host only (127.0.0.1 by
default), as every other socket of the simulator is. No thread: many simulated servers share
one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict

from serve_app.routing.kv.events import ENCODER, END_SEQ, Event, EventBatch, encode_seq


class KVEventsConfig(BaseModel):
    """`--kv-events-config`, vLLM's fields (unknown ones refused)."""

    model_config = ConfigDict(extra="forbid")

    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and (self.publisher or "zmq") == "zmq"


def offset_port(endpoint: str | None, offset: int) -> str | None:
    """The endpoint of the `offset`-th server (vLLM offsets a tcp port per data-parallel rank;
    the simulator per server of one process)."""
    if not endpoint or offset == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + offset}"


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def on_host(endpoint: str, host: str) -> str:
    """`endpoint` with its `*` (every interface) narrowed to `host`."""
    return endpoint.replace("tcp://*:", f"tcp://{host}:", 1)


class ZmqPublisher:
    def __init__(self, config: KVEventsConfig, offset: int = 0, host: str = "127.0.0.1") -> None:
        self._ctx = zmq.asyncio.Context.instance()
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        # A PUB send never waits (past the mark it drops), so a plain socket serves the loop.
        self._pub = zmq.Context.instance().socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        endpoint = offset_port(config.endpoint, offset)
        assert endpoint is not None
        if _binds(endpoint):
            self._pub.bind(on_host(endpoint, host))
        else:
            self._pub.connect(endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        if replay := offset_port(config.replay_endpoint, offset):
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.bind(on_host(replay, host))
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: list[Event]) -> None:
        """One batch, numbered; dropped by ZMQ (not queued) past the high-water mark, as the
        subscriber's replay is there for."""
        payload = ENCODER.encode(EventBatch(ts=time.time(), events=events, data_parallel_rank=0))
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, encode_seq(seq), payload), zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart(
                        (client, b"", self._topic, encode_seq(seq), payload)
                    )
            await self._replay.send_multipart((client, b"", b"", encode_seq(END_SEQ), b""))

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        if self._replay is not None:
            self._replay.close(linger=0)
        self._pub.close(linger=0)
