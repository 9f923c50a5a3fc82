"""A KV-event subscriber's replay request, as vLLM's replay socket answers it (the simulator's
tests and its conformance test against a real vLLM ask both the same way)."""

from __future__ import annotations

import zmq
import zmq.asyncio

from serve_app.routing.kv.events import EventBatch, decode_batch

END_SEQ = (-1).to_bytes(8, "big", signed=True)


async def replay(port: int) -> list[tuple[int, EventBatch]]:
    """Every batch the replay socket on loopback `port` holds, from sequence number 0, with
    its sequence number; each frame checked as vLLM 0.32 sends it (the topic included)."""
    return [(seq, decode_batch(payload)) for seq, payload in await replay_frames(port, b"kv")]


async def replay_frames(port: int, topic: bytes) -> list[tuple[int, bytes]]:
    """As `replay`, the batches undecoded, published under `topic`."""
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    replayed = []
    try:
        await dealer.send_multipart((b"", (0).to_bytes(8, "big")))
        while True:
            assert await dealer.poll(10_000), "no replay answer"
            _, got, seq, payload = await dealer.recv_multipart()
            if seq == END_SEQ:
                assert (got, payload) == (b"", b"")
                return replayed
            assert got == topic
            replayed.append((int.from_bytes(seq, "big"), payload))
    finally:
        dealer.close(linger=0)
