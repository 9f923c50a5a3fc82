"""The simulated vLLM server (serve_app/demo/vllm_sim) held to a real vLLM, configured alike: a
small KV cache (so blocks are evicted), blocks of 32, prompt-token details, KV events over ZMQ,
the scale-out routes, the e2e tiny model's tokenizer and chat template. The same chat requests,
one at a time, to both: the same `/render` token ids (and answer's fields), the same prompt and
cached-token counts per request, the same KV events (kinds, block sizes,
token ids, parent chaining; hash values differ by design, so they are mapped through the blocks'
token ids), and the simulator's metric names with the same label sets. Run by `make e2e`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from serve_app.demo.vllm_sim.profiles import TINY_CPU
from serve_app.demo.vllm_sim.publisher import KVEventsConfig
from serve_app.demo.vllm_sim.server import Fleet, Options, SimServer
from serve_app.routing.kv.events import BlockRemoved, BlockStored, decode_batch
from serve_app.routing.kv.tokens import HfTokenizer
from tests.conftest import free_port
from tests.e2e.vllm_server import MAX_MODEL_LEN, MODEL_DIR, SERVED_MODEL, VllmServer
from tests.kv_events import replay

pytestmark = pytest.mark.e2e
BLOCKS = 16  # 15 usable blocks of 32 tokens: a few long prompts evict the oldest
SENTENCES = [f"The quick brown fox jumps over the lazy dog {i}." for i in range(60)]


def _prompt(start: int, count: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(SENTENCES[start : start + count])}]


# A prompt, one sharing its prefix, unrelated ones that fill the cache, then the first again.
REQUESTS = [
    _prompt(0, 6),
    _prompt(0, 10),
    _prompt(20, 8),
    _prompt(0, 6),
    _prompt(30, 14),
    _prompt(44, 14),
    _prompt(10, 14),
    _prompt(0, 10),
]


class Subscriber:
    """A SUB socket bound on loopback (the server connects to it, as vLLM does), and the
    server's replay socket (which it binds)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.replay_port = free_port()
        self.socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"kv")
        self.socket.bind(f"tcp://127.0.0.1:{self.port}")
        self.events: list[Any] = []
        self.seqs: list[int] = []

    def config(self) -> str:
        return json.dumps(
            {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"tcp://127.0.0.1:{self.port}",
                "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
                "topic": "kv",
            }
        )

    async def drain(self, quiet_ms: int = 500) -> None:
        """What arrived until nothing more comes for `quiet_ms`."""
        while await self.socket.poll(quiet_ms):
            _, seq, payload = await self.socket.recv_multipart()
            self.seqs.append(int.from_bytes(seq, "big"))
            self.events.extend(decode_batch(payload).events)

    async def replay(self) -> tuple[list[int], list[Any]]:
        """Every batch the server still holds, from sequence number 0."""
        batches = await replay(self.replay_port)
        return [seq for seq, _ in batches], [e for _, batch in batches for e in batch.events]


async def _run(
    url: str, events: Subscriber
) -> tuple[list[dict], list[dict], str, list[int], list[Any]]:
    """Each request rendered (`/render`, which runs nothing), then answered; the metrics page
    and the KV event stream replayed from 0."""
    usages, renders = [], []
    async with aiohttp.ClientSession() as http:
        for messages in REQUESTS:
            body = {"model": SERVED_MODEL, "messages": messages, "max_tokens": 1}
            body["temperature"] = 0
            async with http.post(f"{url}/v1/chat/completions/render", json=body) as resp:
                assert resp.status == 200, await resp.text()
                renders.append(await resp.json())
            async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                usages.append((await resp.json())["usage"])
            await events.drain()
        async with http.get(f"{url}/metrics") as resp:
            page = await resp.text()
    return usages, renders, page, *await events.replay()


def _shape(events: list[Any]) -> list[tuple]:
    """The events with each hash replaced by the token ids of the block it names."""
    tokens: dict[int, tuple[int, ...]] = {}
    out: list[tuple] = []
    for event in events:
        if isinstance(event, BlockStored):
            size = event.block_size
            for i, h in enumerate(event.block_hashes):
                tokens[h] = tuple(event.token_ids[i * size : (i + 1) * size])
            parent = tokens.get(event.parent_block_hash) if event.parent_block_hash else None
            out.append(("stored", size, tuple(event.token_ids), parent, event.medium))
        elif isinstance(event, BlockRemoved):
            out.append(("removed", tuple(tokens[h] for h in event.block_hashes)))
        else:
            out.append((type(event).__name__,))
    return out


def _labels(page: str) -> dict[str, set[str]]:
    return {
        sample.name: set(sample.labels)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name.startswith("vllm:")
    }


async def test_the_simulator_accounts_tokens_blocks_and_metrics_as_vllm_does() -> None:
    real_events, sim_events = Subscriber(), Subscriber()
    server = VllmServer(
        "fleet-conformance",
        free_port(),
        core="nobind",  # a third server beside the session's two, each pinned to a core
        extra=[
            *["--block-size", "32", "--num-gpu-blocks-override", str(BLOCKS)],
            *["--enable-prompt-tokens-details", "--kv-events-config", real_events.config()],
            "--enable-scale-out",  # the /render routes
        ],
    )
    profile = TINY_CPU.model_copy(update={"num_gpu_blocks": BLOCKS, "max_model_len": MAX_MODEL_LEN})
    options = Options(
        model=SERVED_MODEL,
        profile=profile,
        prompt_tokens_details=True,
        scale_out=True,
        kv_events=KVEventsConfig.model_validate_json(sim_events.config()),
    )
    fleet = Fleet()
    sim = SimServer(options, HfTokenizer(MODEL_DIR / "base"), fleet)
    sim_port = free_port()
    server.start()
    try:
        await sim.start("127.0.0.1", sim_port)
        fleet.start()
        await asyncio.to_thread(server.wait_ready)
        real_run = await _run(server.url, real_events)
        sim_run = await _run(f"http://127.0.0.1:{sim_port}", sim_events)
    finally:
        server.stop()
        await fleet.stop()
        await sim.stop()
        real_events.socket.close(linger=0)
        sim_events.socket.close(linger=0)
    real_usage, real_renders, real_page, real_seqs, real_replayed = real_run
    sim_usage, sim_renders, sim_page, sim_seqs, sim_replayed = sim_run
    assert [r["token_ids"] for r in sim_renders] == [r["token_ids"] for r in real_renders]
    assert set(sim_renders[0]) == set(real_renders[0])
    assert [u["prompt_tokens"] for u in sim_usage] == [u["prompt_tokens"] for u in real_usage]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in real_usage]
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in sim_usage] == cached
    assert any(cached), "no request hit the cache"
    for live in (real_events.seqs, sim_events.seqs):  # numbered in order, none lost once joined
        assert live == list(range(live[0], live[0] + len(live)))
    assert real_seqs == list(range(len(real_seqs)))
    assert sim_seqs == list(range(len(sim_seqs)))
    real, simulated = _shape(real_replayed), _shape(sim_replayed)
    assert any(e[0] == "removed" for e in real), "nothing was evicted"
    assert simulated == real
    real_labels, sim_labels = _labels(real_page), _labels(sim_page)
    for name, labels in sim_labels.items():
        assert real_labels.get(name) == labels, name
