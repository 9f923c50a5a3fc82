"""kv_aware on real Serve in front of three simulated vLLM servers that publish their KV-cache
events (serve_app/demo/vllm_sim, the tiny model's tokenizer and template on both sides): the
ingress tokenizes each prompt as the servers do, the picker's index follows the servers' events,
and a conversation's next turn goes to the server that holds its prefix, where it is a cache hit;
when the servers empty their caches the index empties too."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest

from bench.fleet import SERVED, SimFleet, fleet
from bench.fleet_text import Texts
from serve_app.core.metrics import (
    IN_FLIGHT_METRIC,
    KV_BLOCKS_METRIC,
    KV_PREDICTED_METRIC,
    KV_PREDICTIONS_METRIC,
    KV_REPORTED_METRIC,
)
from serve_app.pickers.plan import PROVIDER_HEADER
from tests.conftest import ADMIN, deploy, provider, samples, wait_for
from tests.e2e.tiny_model import write_tokenizer

pytestmark = pytest.mark.serve

TYPE = "kv_models"
MODEL = "kv/chat"
DOCS = 6
DOC_TOKENS = 600  # 37 blocks of 16


class Fleet(NamedTuple):
    url: str
    sim: SimFleet
    texts: Texts


@pytest.fixture(scope="module")
def kv_fleet(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    with fleet(3, folder, kv_events=True) as sim:
        providers = [
            provider(
                f"sim-{i}",
                url,
                "vllm",
                model_path=SERVED,
                input_size=32_768,
                # As the server was given it (it binds `*`): the router connects to its host.
                kv_events={"endpoint": pub.replace("127.0.0.1", "*")},
            )
            for i, (url, (pub, _)) in enumerate(zip(sim.urls, sim.kv_events, strict=True))
        ]
        config = {
            TYPE: {MODEL: {"providers": providers, "tokenizer": str(folder)}},
            "active_models": {TYPE: [MODEL]},
            "routing": {TYPE: {"strategy": "kv_aware", "health_check_interval_s": 0.5}},
        }
        deploy(serve_url, config)
        yield Fleet(serve_url, sim, Texts.for_tokenizer(Path(folder)))


def _messages(texts: Texts, doc: int, turn: int) -> list[dict[str, str]]:
    """A shared preamble (its first blocks equal for every document), the document, then a
    question per turn."""
    return [
        {"role": "system", "content": texts.words("preamble", 48)},
        {"role": "user", "content": texts.words(f"doc{doc}", DOC_TOKENS)},
        {"role": "assistant", "content": texts.words(f"answer{doc}", 20)},
        {"role": "user", "content": texts.words(f"question{doc}-{turn}", 30)},
    ]


async def _ask(
    http: aiohttp.ClientSession, url: str, messages: list, stream: bool = False
) -> tuple[str, dict]:
    """The provider that answered and the answer's usage (a stream's last chunk's)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": 4}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            return resp.headers[PROVIDER_HEADER], (await resp.json())["usage"]
        events = [line[6:] async for line in resp.content if line.startswith(b"data: {")]
        return resp.headers[PROVIDER_HEADER], json.loads(events[-1])["usage"]


def _per_provider(url: str, metric: str) -> dict[str, float]:
    request = urllib.request.Request(f"{url}/metrics", headers=ADMIN)
    with urllib.request.urlopen(request, timeout=5) as resp:
        page = resp.read().decode()
    found = samples(page, metric)
    return {key.split('provider="')[1].split('"')[0]: value for key, value in found.items()}


def _predictions(url: str) -> dict[str, float]:
    """kv_aware's predictions of cached tokens held to the servers' reports: by result, and
    the two token sums."""
    request = urllib.request.Request(f"{url}/metrics", headers=ADMIN)
    with urllib.request.urlopen(request, timeout=5) as resp:
        page = resp.read().decode()
    found = {
        key.split('result="')[1].split('"')[0]: value
        for key, value in samples(page, f"{KV_PREDICTIONS_METRIC}_total").items()
    }
    for name in (KV_PREDICTED_METRIC, KV_REPORTED_METRIC):
        found[name] = sum(samples(page, f"{name}_total").values())
    return found


def _index_blocks(url: str) -> dict[str, float]:
    return _per_provider(url, KV_BLOCKS_METRIC)


def _idle(url: str) -> bool:
    """The picker counts nothing in flight (the router's own requests there and not yet
    running at the engine are queued there: an ended request counts until its report comes)."""
    return not any(_per_provider(url, IN_FLIGHT_METRIC).values())


async def test_a_conversations_next_turn_goes_to_the_server_holding_its_prefix(
    kv_fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    """The first turns go out at once (spread by load), the second ones one at a time on an
    idle fleet (nothing in flight, as the picker counts it): without the index they would all
    meet on one server (their costs equal, the same first block), with it each goes where its
    document is cached, and is a cache hit of exactly the tokens the router predicted (every
    other one streamed: its usage chunk is read too)."""
    url, texts = kv_fleet.url, kv_fleet.texts
    first = await asyncio.gather(*(_ask(http, url, _messages(texts, d, 1)) for d in range(DOCS)))
    holders = [p for p, _ in first]
    assert len(set(holders)) >= 2, holders  # spread: the check below can fail

    def indexed() -> bool:
        blocks = _index_blocks(url)
        return all(blocks.get(p, 0) >= DOC_TOKENS // 16 for p in set(holders))

    wait_for(indexed, 15, "the picker's index to hold the first turns' blocks")
    results = ("exact", "over", "under")
    wait_for(
        lambda: sum(_predictions(url).get(r, 0) for r in results) == DOCS,
        15,
        "the first turns' predictions counted",
    )
    before = _predictions(url)
    reported = 0
    for d in range(DOCS):
        wait_for(lambda: _idle(url), 15, "the router's requests to end")
        served, usage = await _ask(http, url, _messages(texts, d, 2), stream=d % 2 == 1)
        assert served == holders[d], (d, served, holders)
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached >= DOC_TOKENS, (d, usage)  # preamble + document at least
        reported += cached

    def counted() -> bool:
        after = _predictions(url)
        return after.get("exact", 0) - before.get("exact", 0) == DOCS

    wait_for(counted, 15, "every second turn's prediction counted exact")
    after = _predictions(url)
    assert after.get("over", 0) == before.get("over", 0)
    assert after.get("under", 0) == before.get("under", 0)
    for name in (KV_PREDICTED_METRIC, KV_REPORTED_METRIC):
        assert after[name] - before[name] == reported, name


async def test_servers_that_empty_their_caches_empty_the_index(
    kv_fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    url = kv_fleet.url
    await _ask(http, url, _messages(kv_fleet.texts, 99, 1))
    wait_for(lambda: sum(_index_blocks(url).values()) > 0, 15, "blocks in the index")
    async with http.post(f"{kv_fleet.sim.urls[0]}/sim/reset", json={}) as resp:
        assert resp.status == 200  # every server of the process: AllBlocksCleared
    wait_for(lambda: sum(_index_blocks(url).values()) == 0, 15, "an empty index")
