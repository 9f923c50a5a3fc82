"""Records a real vLLM's KV-cache event stream for the index's unit tests
(tests/wire/vllm_kv_events.json): `python -m tests.e2e.record_kv_events` after `make e2e` has
made the environment and the model.

One server with a small cache (blocks of 32 tokens, 12 of them: a few prompts evict the
oldest), KV events published to a socket this script binds on loopback, its replay socket, and
LoRA adapter `a1` loaded. The requests: a prompt; the same prompt a turn longer (a prefix hit);
the first prompt through the adapter (blocks of its own); unrelated prompts that evict; a reset
of the prefix cache (AllBlocksCleared); a prompt after it. Saved: each request's token ids (the
server's own `/tokenize`), the `cached_tokens` the server reported for it and how many event
batches had arrived before it was sent; then every batch from sequence number 0 as the replay
socket returns it (msgpack, base64), so a unit test can rebuild the index as it stood before
each request and hold its prediction to the server's count.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import zmq
import zmq.asyncio

from serve_app.routing.kv.events import decode_batch, decode_seq
from tests.conftest import free_port
from tests.e2e.vllm_server import MODEL_DIR, SERVED_MODEL, VllmServer
from tests.kv_events import replay_frames

WIRE_FILE = "vllm_kv_events.json"
BLOCK_SIZE = 32
BLOCKS = 12
ADAPTER = "a1"
SERVER_ARGS = [
    *["--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(BLOCKS)],
    "--enable-prompt-tokens-details",
]
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
]


def _text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed + i * (1 + seed % 4)) % len(WORDS)] for i in range(words))


def _chat(seed: int, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": _text(seed, 24)}]
    for turn in range(turns):
        messages.append({"role": "user", "content": _text(seed + turn + 1, 10)})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": _text(seed + turn + 5, 6)})
    return messages


# (what it shows, the model it goes to, its messages); "reset" empties the prefix cache.
STEPS: list[tuple[str, str, list[dict[str, str]] | None]] = [
    ("first", SERVED_MODEL, _chat(0, 1)),
    ("next turn (prefix hit)", SERVED_MODEL, _chat(0, 2)),
    ("adapter, same prompt", ADAPTER, _chat(0, 1)),
    ("unrelated 1", SERVED_MODEL, _chat(1, 2)),
    ("unrelated 2", SERVED_MODEL, _chat(2, 2)),
    ("unrelated 3", SERVED_MODEL, _chat(3, 2)),
    ("first again (after evictions)", SERVED_MODEL, _chat(0, 1)),
    ("reset", "", None),
    ("after the reset", SERVED_MODEL, _chat(0, 2)),
]


class _Live:
    """The server's live stream: a SUB socket bound on loopback (the server connects to it)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.bind(f"tcp://127.0.0.1:{self.port}")
        self.seen = 0  # batches received

    async def drain(self, quiet_ms: int = 1000) -> None:
        while await self.socket.poll(quiet_ms):
            _, seq, payload = await self.socket.recv_multipart()
            decode_batch(payload)
            self.seen = decode_seq(seq) + 1


async def _record(server: VllmServer, live: _Live, replay_port: int) -> dict[str, Any]:
    requests = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        body = {"lora_name": ADAPTER, "lora_path": str(MODEL_DIR / ADAPTER)}
        async with http.post(f"{server.url}/v1/load_lora_adapter", json=body) as resp:
            assert resp.status == 200, await resp.text()
        await live.drain()
        for what, model, messages in STEPS:
            if messages is None:
                async with http.post(f"{server.url}/reset_prefix_cache") as resp:
                    assert resp.status == 200, await resp.text()
                await live.drain()
                requests.append({"step": what, "after_batches": live.seen})
                continue
            async with http.post(
                f"{server.url}/tokenize", json={"model": model, "messages": messages}
            ) as resp:
                tokens = (await resp.json())["tokens"]
            before = live.seen
            chat = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}
            async with http.post(f"{server.url}/v1/chat/completions", json=chat) as resp:
                answer = await resp.json()
                assert resp.status == 200, (what, len(tokens), answer)
                usage = answer["usage"]
            assert usage["prompt_tokens"] == len(tokens), (usage, len(tokens))
            await live.drain()
            requests.append(
                {
                    "step": what,
                    "lora": model if model == ADAPTER else None,
                    "token_ids": tokens,
                    "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                    "before_batches": before,
                }
            )
    batches = await replay_frames(replay_port, b"")
    return {
        "recorded_by": "tests/e2e/record_kv_events.py",
        "server_args": SERVER_ARGS,
        "block_size": BLOCK_SIZE,
        "requests": requests,
        "batches": [
            {"seq": seq, "payload": base64.b64encode(payload).decode()} for seq, payload in batches
        ],
    }


def main() -> None:
    live, replay_port = _Live(), free_port()
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{live.port}",
        "replay_endpoint": f"tcp://127.0.0.1:{replay_port}",
        "topic": "",
    }
    server = VllmServer(
        "record-kv",
        free_port(),
        core=0,
        extra=[*SERVER_ARGS, "--kv-events-config", json.dumps(events)],
        env={"VLLM_SERVER_DEV_MODE": "1"},  # the /reset_prefix_cache route
    )
    server.start()
    try:
        server.wait_ready()
        doc = asyncio.run(_record(server, live, replay_port))
    finally:
        server.stop()
        live.socket.close(linger=0)
    path = MODEL_DIR.parents[1] / "tests" / "wire" / WIRE_FILE
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{path}: {len(doc['requests'])} requests, {len(doc['batches'])} batches")


if __name__ == "__main__":
    main()
