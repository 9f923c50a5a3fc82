"""kv_aware in front of three real vLLM servers (CPU build, the tiny model) that publish their
KV-cache events, each with a cache of 24 blocks of 32 tokens (a few prompts evict it): the
router's predicted cached tokens against the `cached_tokens` each server reports
(llm_router_kv_predictions), an eviction seen within a second, a killed and restarted server's
blocks gone, and a LoRA adapter's prompts never matched to its base model's blocks. Run by
`make e2e`; the three servers are this module's own (beside the session's two)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import NamedTuple

import aiohttp
import pytest

from bench.fleet_text import Texts
from serve_app.core.metrics import (
    KV_BLOCKS_METRIC,
    KV_EVENTS_METRIC,
    KV_PREDICTED_METRIC,
    KV_PREDICTIONS_METRIC,
    KV_REPORTED_METRIC,
)
from serve_app.pickers.plan import PROVIDER_HEADER
from tests.conftest import ADMIN, deploy, free_port, provider, wait_for
from tests.e2e.conftest import models_config
from tests.e2e.test_vllm import post, router_metric
from tests.e2e.vllm_server import MODEL_DIR, SERVED_MODEL, VllmServer

pytestmark = pytest.mark.e2e

KV_TYPE = "kv_models"
MODEL = "e2e/kv"
ADAPTER = "e2e-kv-sql"
BLOCK = 32
BLOCKS = 24
RESULTS = ("exact", "over", "under")
SERVERS = [f"kv-{i}" for i in range(3)]


class KvRouter(NamedTuple):
    url: str
    servers: list[VllmServer]
    texts: Texts


def _server(name: str) -> tuple[VllmServer, dict[str, str]]:
    """A server publishing to a socket the router binds on loopback (vLLM connects to an
    endpoint without `*`), with its replay socket; and the provider's `kv_events`."""
    events = {
        "endpoint": f"tcp://127.0.0.1:{free_port()}",
        "replay_endpoint": f"tcp://127.0.0.1:{free_port()}",
    }
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "", **events}
    server = VllmServer(
        name,
        free_port(),
        core="nobind",
        extra=[
            *["--block-size", str(BLOCK), "--num-gpu-blocks-override", str(BLOCKS)],
            *["--enable-prompt-tokens-details", "--kv-events-config", json.dumps(config)],
        ],
    )
    return server, events


@pytest.fixture(scope="module")
def kv(serve_url: str, vllm: list[VllmServer]) -> Iterator[KvRouter]:
    made = [_server(name) for name in SERVERS]
    servers = [s for s, _ in made]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        config = models_config(vllm)
        providers = [
            provider(s.name, s.url, "vllm", model_path=SERVED_MODEL, input_size=256, kv_events=e)
            for s, e in made
        ]
        config[KV_TYPE] = {
            MODEL: {"providers": providers, "tokenizer": str(MODEL_DIR / "base")},
        }
        config[KV_TYPE][MODEL]["kv_block_size"] = BLOCK
        config["active_models"][KV_TYPE] = [MODEL]
        config["routing"] = {KV_TYPE: {"strategy": "kv_aware", "health_check_interval_s": 0.5}}
        deploy(serve_url, config)
        yield KvRouter(serve_url, servers, Texts.for_tokenizer(MODEL_DIR / "base"))
    finally:
        for server in servers:
            server.stop()
        deploy(serve_url, models_config(vllm))  # as the other e2e modules expect it


class Answer(NamedTuple):
    provider: str
    text: str
    cached: int


async def _chat(
    http: aiohttp.ClientSession, url: str, messages: list[dict], model: str = MODEL, **extra: object
) -> Answer:
    body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}
    stream = bool(extra.get("stream"))
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        served = resp.headers.get(PROVIDER_HEADER, "")
        if not stream:
            doc = await resp.json()
            text, usage = doc["choices"][0]["message"]["content"], doc["usage"]
        else:
            chunks = [json.loads(line[6:]) async for line in resp.content if line[:7] == b"data: {"]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
            usage = chunks[-1]["usage"]
    return Answer(served, text, usage["prompt_tokens_details"]["cached_tokens"])


def _applied(url: str) -> dict[str, float]:
    """The KV-event batches the router's index has applied, per provider."""
    metric = f"{KV_EVENTS_METRIC}_total"
    return {s: router_metric(url, metric, provider=s, kind="applied") for s in SERVERS}


async def _indexed(
    http: aiohttp.ClientSession, url: str, messages: list, **extra: object
) -> Answer:
    """The answer, once the router's index has applied a batch of the server that gave it.
    vLLM publishes a request's blocks about when its answer ends, so a next turn sent at once
    can be planned before they arrive (routed as a cold prompt); these tests are about what
    the index holds, so they wait for it."""
    before = _applied(url)
    answer = await _chat(http, url, messages, **extra)
    wait_for(lambda: _applied(url)[answer.provider] > before[answer.provider], 20, "its blocks")
    return answer


def _predictions(url: str, model: str = MODEL) -> dict[str, float]:
    """The router's predictions for `model`: how many by result, and the two token sums."""
    counts = {
        r: router_metric(url, f"{KV_PREDICTIONS_METRIC}_total", model=model, result=r)
        for r in RESULTS
    }
    counts["predicted"] = router_metric(url, f"{KV_PREDICTED_METRIC}_total", model=model)
    counts["reported"] = router_metric(url, f"{KV_REPORTED_METRIC}_total", model=model)
    return counts


def _settled(url: str, before: dict[str, float], answers: int, model: str = MODEL) -> dict:
    """The predictions counted since `before`, once all `answers` are (each replica pushes its
    counts every second)."""
    found: dict[str, float] = {}

    def counted() -> bool:
        found.update(_predictions(url, model))
        return sum(found[r] - before[r] for r in RESULTS) >= answers

    try:
        wait_for(counted, 20, f"{answers} predictions counted")
    except AssertionError as err:
        raise AssertionError(f"{err}: {found} since {before}") from None
    return {k: found[k] - before[k] for k in found}


def _conversation(texts: Texts, n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": texts.words(f"s{n}", 70)}]


async def test_predicted_cached_tokens_equal_the_servers_for_a_multi_turn_workload(
    kv: KvRouter, http: aiohttp.ClientSession
) -> None:
    """Eight conversations of three turns at once (two thirds of the three caches together),
    each turn with the previous answers, every other conversation streamed: at least 95 % of
    the answers' cached tokens are the router's prediction, the later turns hit the cache (so
    the predictions are not all zero), and at least two servers served (the check would pass
    on one). A prediction is made when the request is planned: blocks its server evicts for
    another request before it schedules this one make it `over`; with caches of 16 blocks
    (the conversations filling them) 0 to 2 of 24 were."""
    url, texts = kv.url, kv.texts
    before = _predictions(url)
    served: list[str] = []

    async def talk(n: int) -> None:
        messages = _conversation(texts, n)
        stream = {"stream": True, "stream_options": {"include_usage": True}} if n % 2 else {}
        for turn in range(3):
            messages.append({"role": "user", "content": texts.words(f"q{n}-{turn}", 25)})
            answer = await _chat(http, url, messages, **stream)
            served.append(answer.provider)
            messages.append({"role": "assistant", "content": answer.text})

    await asyncio.gather(*(talk(n) for n in range(8)))
    got = _settled(url, before, 24)
    exact = got["exact"] / sum(got[r] for r in RESULTS)
    print(f"\nkv predictions: {got}, exact {exact:.3f}, served {sorted(set(served))}")
    assert exact >= 0.95, got
    assert got["reported"] > 0 and got["predicted"] > 0, got
    assert len(set(served)) >= 2, served


async def test_an_evicted_prefix_stops_being_preferred_within_a_second(
    kv: KvRouter, http: aiohttp.ClientSession
) -> None:
    """A conversation's second turn goes to the server holding its first (a predicted hit);
    unrelated prompts sent straight to that server then evict it. The same second turn sent
    one second after the last eviction is predicted as the servers then report it (no longer
    that hit): a stale index would send it to the old holder expecting the hit (`over`)."""
    url, texts = kv.url, kv.texts
    messages = _conversation(texts, 100)
    messages.append({"role": "user", "content": texts.words("evict-q", 25)})
    first = await _indexed(http, url, messages)
    messages += [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": texts.words("evict-q2", 25)},
    ]
    before = _predictions(url)
    second = await _chat(http, url, messages)
    got = _settled(url, before, 1)
    assert second.provider == first.provider and second.cached > 0, (first, second)
    assert got["exact"] == 1 and got["predicted"] == second.cached, got
    holder = next(s for s in kv.servers if s.name == first.provider)
    for n in range(5):  # 5 x 7 blocks through a 24-block cache
        filler = [{"role": "user", "content": texts.words(f"filler-{n}", 200)}]
        await _chat(http, holder.url, filler, model=SERVED_MODEL, max_tokens=1)
    evicted = time.monotonic()
    await asyncio.sleep(max(0.0, evicted + 1.0 - time.monotonic()))  # the bound under test
    before = _predictions(url)
    again = await _chat(http, url, messages)
    got = _settled(url, before, 1)
    assert again.cached < second.cached, (second, again)  # the holder did evict it
    assert got["exact"] == 1 and got["predicted"] == again.cached, (got, again)


def _blocks(url: str, server: VllmServer) -> float:
    return router_metric(url, KV_BLOCKS_METRIC, provider=server.name)


async def test_a_killed_and_restarted_servers_blocks_are_gone_from_the_index(
    kv: KvRouter, http: aiohttp.ClientSession
) -> None:
    """kill -9 of a server holding blocks: its blocks leave the index (its circuit opens);
    restarted, it holds none until it caches again, and what the router predicts for it
    is again what it reports."""
    url, texts = kv.url, kv.texts
    wait_for(lambda: any(_blocks(url, s) for s in kv.servers), 20, "blocks in the index")
    victim = max(kv.servers, key=lambda s: _blocks(url, s))
    victim.kill()
    wait_for(lambda: _blocks(url, victim) == 0, 30, "the killed server's blocks dropped")
    victim.start()
    victim.wait_ready()
    assert _blocks(url, victim) == 0
    before = _predictions(url)
    for n in range(6):  # some reach the restarted server (least loaded, cold everywhere)
        messages = _conversation(texts, 200 + n)
        messages.append({"role": "user", "content": texts.words(f"restart-{n}", 20)})
        await _chat(http, url, messages)
    got = _settled(url, before, 6)
    assert got["exact"] == 6, got


async def test_an_adapters_prompt_is_not_matched_to_its_base_models_blocks(
    kv: KvRouter, http: aiohttp.ClientSession
) -> None:
    """A prompt cached by the base model, then sent to a LoRA adapter of it: predicted and
    reported as no hit (vLLM keys an adapter's blocks apart); sent to the adapter again, it is
    a predicted hit on the server that now holds the adapter's blocks."""
    url, texts = kv.url, kv.texts
    status, answer = post(
        f"{url}/api/v1/adapters",
        {"name": ADAPTER, "base_model": MODEL, "source": str(MODEL_DIR / "a1")},
        ADMIN,
    )
    assert status == 201 and answer["unconfirmed_replicas"] == [], answer
    try:
        await _adapter_checks(url, texts, http)
    finally:
        request = urllib.request.Request(
            f"{url}/api/v1/adapters/{ADAPTER}", method="DELETE", headers=ADMIN
        )
        urllib.request.urlopen(request, timeout=60).close()


async def _adapter_checks(url: str, texts: Texts, http: aiohttp.ClientSession) -> None:
    messages = _conversation(texts, 300)
    messages.append({"role": "user", "content": texts.words("adapter-q", 25)})
    before = _predictions(url)
    base = await _indexed(http, url, messages)
    again = await _chat(http, url, messages)
    got = _settled(url, before, 2)
    assert again.cached > 0, (base, again, got)  # the base model's blocks, indexed
    before = _predictions(url, ADAPTER)
    first = await _indexed(http, url, messages, model=ADAPTER)
    got = _settled(url, before, 1, ADAPTER)
    assert first.cached == 0 and got["exact"] == 1 and got["predicted"] == 0, (got, base)
    second = await _chat(http, url, messages, model=ADAPTER)
    got = _settled(url, before, 2, ADAPTER)
    assert second.provider == first.provider and second.cached > 0, (first, second)
    assert got["exact"] == 2 and got["predicted"] == second.cached, got
