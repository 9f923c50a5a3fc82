"""Responses state through a pool, on real Serve with 2 ingress replicas and keys required: a
conversation continued with `previous_response_id` across providers that keep nothing (an
OpenAI-type and an Ollama-type demo upstream), the store actor killed mid-conversation, the id
routes, background mode and cancel, key isolation, and affinity to vLLM-type servers that keep
their own copy (the demo with vLLM's Responses store on)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import openai
import orjson
import pytest
import ray

from serve_app.cluster.registry.actor import NAMESPACE
from serve_app.conversations.actor import responses_handle
from serve_app.conversations.service import Conversations
from serve_app.core.errors import RouterError
from serve_app.demo.upstream import FakeUpstream
from serve_app.pickers.plan import PROVIDER_HEADER, Head, Unary
from tests.conftest import ADMIN, ADMIN_TOKEN, REGISTRY, deploy, provider, until

pytestmark = pytest.mark.serve

TYPE = "conversing_models"


@dataclass
class Pool:
    url: str
    oa: FakeUpstream  # api_type openai
    ol: FakeUpstream  # api_type ollama
    va: FakeUpstream  # api_type vllm, its Responses store on
    vb: FakeUpstream
    key: str  # a client key
    key_id: str  # its id: what owns its responses
    other: str  # another client key

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key or self.key)

    def upstream(self, name: str) -> FakeUpstream:
        return next(u for u in (self.oa, self.ol, self.va, self.vb) if u.name == name)


async def _key(url: str) -> tuple[str, str]:
    """A new client key, and its id."""
    async with aiohttp.ClientSession() as http:
        body = {"name": f"conv-{time.monotonic_ns()}"}
        async with http.post(f"{url}/api/v1/keys", json=body, headers=ADMIN) as resp:
            assert resp.status == 201
            made = await resp.json()
            return made["key"], made["id"]


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    oa, ol, va, vb = (upstream_factory(n) for n in ("c-oa", "c-ol", "c-va", "c-vb"))
    va.knobs.responses_store = vb.knobs.responses_store = True
    config = {
        TYPE: {
            "m/chat": {
                "providers": [
                    provider("c-oa", oa.url, "openai"),
                    provider("c-ol", ol.url, "ollama", model_path="llama3.2:1b"),
                ]
            },
            "m/vllm": {
                "providers": [
                    provider("c-va", va.url, "vllm", responses_store=True),
                    provider("c-vb", vb.url, "vllm", responses_store=True),
                ]
            },
            "m/small": {"providers": [provider("c-small", oa.url, "openai", input_size=40)]},
        },
        "active_models": {TYPE: ["m/chat", "m/vllm", "m/small"]},
        "routing": {
            TYPE: {"strategy": "round_robin", "unhealthy_cooldown_s": 0, "circuit_failures": 1000}
        },
        "auth": {"require_keys": True},
    }
    deploy(serve_url, config, ingress_replicas=2)
    (key, key_id), (other, _) = asyncio.run(_key(serve_url)), asyncio.run(_key(serve_url))
    return Pool(serve_url, oa, ol, va, vb, key, key_id, other)


async def _turn(
    client: openai.AsyncOpenAI, model: str, text: str, previous: str | None = None, **extra
) -> tuple[openai.types.responses.Response, str, str]:
    """The response, the provider that answered and the attempts it took."""
    raw = await client.responses.with_raw_response.create(
        model=model, input=text, previous_response_id=previous, **extra
    )
    return raw.parse(), raw.headers["x-router-provider"], raw.headers["x-router-attempts"]


def _said(up: FakeUpstream, role: str) -> list[str]:
    """The texts of `role`'s messages in the last request the upstream got (chat or Ollama
    form: a string, or text parts)."""
    messages = up.requests[-1].body["messages"]
    return [
        m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
        for m in messages
        if m["role"] == role
    ]


def _users(up: FakeUpstream) -> list[str]:
    return _said(up, "user")


async def test_a_conversation_goes_on_across_providers_that_keep_nothing(pool: Pool) -> None:
    client = pool.client()
    previous, providers, counted = None, [], []
    for n in range(1, 6):
        response, served, _ = await _turn(client, "m/chat", f"turn {n}", previous)
        up = pool.upstream(served)
        assert response.output_text == f"{up.name}: turn {n}"
        # The provider got the whole conversation: every user turn, every answer between.
        assert _users(up) == [f"turn {i}" for i in range(1, n + 1)]
        assistants = _said(up, "assistant")
        assert len(assistants) == n - 1 and all(": turn " in a for a in assistants)
        assert response.usage is not None
        providers.append(served)
        counted.append(response.usage.input_tokens)
        previous = response.id
    assert providers[::2] == [providers[0]] * 3 and providers[1::2] == [providers[1]] * 2
    assert set(providers) == {"c-oa", "c-ol"}
    assert counted == sorted(counted) and len(set(counted)) == 5  # the history arrived
    # A streamed turn is stored too (before its final event), and continued at once.
    stream = await client.responses.create(
        model="m/chat", input="turn 6", previous_response_id=previous, stream=True
    )
    events = [event async for event in stream]
    streamed = events[-1].response
    response, served, _ = await _turn(client, "m/chat", "turn 7", streamed.id)
    assert _users(pool.upstream(served)) == [f"turn {i}" for i in range(1, 8)]


async def test_the_id_routes_and_key_isolation(pool: Pool) -> None:
    client = pool.client()
    first, _, _ = await _turn(client, "m/chat", "alpha")
    second, _, _ = await _turn(client, "m/chat", "beta", first.id)
    got = await client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    replayed = [e async for e in await client.responses.retrieve(second.id, stream=True)]
    kinds = [e.type for e in replayed]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_item.done" in kinds
    assert replayed[-1].response.output_text == second.output_text
    items = await client.responses.input_items.list(second.id, order="asc")
    kinds = [(i.type, getattr(i, "role", None)) for i in items.data]
    assert kinds == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert len({i.id for i in items.data}) == 3
    # Another key: as if it did not exist (never 403), for reading, continuing and deleting.
    stranger = pool.client(pool.other)
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        await _turn(stranger, "m/chat", "gamma", second.id)
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.input_items.list(second.id)
    # The admin token sees every key's.
    admin = pool.client(ADMIN_TOKEN)
    assert (await admin.responses.retrieve(second.id)).id == second.id
    # A synchronous response cannot be cancelled; deleted, it is gone for continuations too.
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(second.id)
    await client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError) as info:
        await _turn(client, "m/chat", "delta", second.id)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "previous_response_id"
    # store: false keeps nothing.
    unstored, _, _ = await _turn(client, "m/chat", "epsilon", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)


async def test_the_store_actor_killed_mid_conversation(pool: Pool) -> None:
    """The replicas beside the store's actor use its file, so a conversation goes on while the
    actor is dead; what goes through the actor (background runs, a replica elsewhere:
    tests/multinode_responses.py) gets an actor made again on the same file, which has the turn
    written while none ran."""
    client = pool.client()
    first, _, _ = await _turn(client, "m/chat", "one")
    second, _, _ = await _turn(client, "m/chat", "two", first.id)
    store = ray.get_actor(f"{REGISTRY.name}-responses", namespace=NAMESPACE)
    ray.kill(store)  # no restart: it is made again, from the same file
    third, served, _ = await _turn(client, "m/chat", "three", second.id)
    assert _users(pool.upstream(served)) == ["one", "two", "three"]
    # Through the actor: a new one, which reads what the replicas wrote meanwhile.
    actor = responses_handle(REGISTRY)
    assert actor._actor_id != store._actor_id
    stored = orjson.loads(await actor.get.remote(third.id, pool.key_id))
    assert stored["id"] == third.id and stored["turns"] == 3
    # A background continuation: stored, run and settled through the actor.
    queued = await client.responses.create(
        model="m/chat", input="four", previous_response_id=third.id, background=True
    )

    async def completed() -> bool:
        return (await client.responses.retrieve(queued.id)).status == "completed"

    await until(completed, "the background response to complete")
    done = await client.responses.retrieve(queued.id)
    maker = pool.upstream(done.output_text.split(":")[0])
    assert _users(maker) == ["one", "two", "three", "four"]
    # Deleted through the actor: the replicas, reading the file, no longer find it.
    assert await actor.delete.remote(third.id, pool.key_id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(third.id)


async def test_a_conversation_longer_than_the_model_is_a_clear_400(pool: Pool) -> None:
    client = pool.client()
    previous = None
    with pytest.raises(openai.BadRequestError) as info:
        for n in range(20):
            response, _, _ = await _turn(client, "m/small", f"a few more words {n}", previous)
            previous = response.id
    assert previous is not None  # the first turns fit
    body = info.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("context_length_exceeded", "previous_response_id")
    assert "conversation" in body["message"]


async def test_background_responses_are_polled_and_cancelled(pool: Pool) -> None:
    client = pool.client()
    queued = await client.responses.create(model="m/chat", input="later", background=True)
    assert queued.status in ("queued", "in_progress") and queued.background

    async def completed() -> bool:
        return (await client.responses.retrieve(queued.id)).status == "completed"

    await until(completed, "the background response to complete")
    done = await client.responses.retrieve(queued.id)
    assert done.output_text.endswith(": later") and done.id == queued.id
    _, served, _ = await _turn(client, "m/chat", "after", done.id)
    assert _users(pool.upstream(served)) == ["later", "after"]

    pool.oa.knobs.hold = pool.ol.knobs.hold = True
    held = pool.oa.disconnects + pool.ol.disconnects
    try:
        slow = await client.responses.create(model="m/chat", input="slow", background=True)

        async def upstream_called() -> bool:
            return pool.oa.active + pool.ol.active == 1

        await until(upstream_called, "the background call to reach an upstream")
        # Cancelled from the other key: not found; from its own key (any replica): stopped.
        with pytest.raises(openai.NotFoundError):
            await pool.client(pool.other).responses.cancel(slow.id)
        cancelled = await client.responses.cancel(slow.id)
        assert cancelled.status == "cancelled"

        async def hung_up() -> bool:
            return pool.oa.disconnects + pool.ol.disconnects == held + 1

        await until(hung_up, "the upstream call to be closed")
        assert (await client.responses.retrieve(slow.id)).status == "cancelled"
    finally:
        pool.oa.release()
        pool.ol.release()
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="m/chat", input="x", background=True, store=False)


async def test_continuations_go_back_to_the_vllm_that_keeps_them(pool: Pool) -> None:
    client = pool.client()
    response, maker, _ = await _turn(client, "m/vllm", "first")
    for n in range(2, 8):  # round_robin would alternate: the keeper wins every time
        response, served, attempts = await _turn(client, "m/vllm", f"turn {n}", response.id)
        assert (served, attempts) == (maker, "1")
        sent = pool.upstream(maker).requests[-1].body
        assert sent["previous_response_id"] == response.previous_response_id
        assert sent["input"] == f"turn {n}"  # the short form: the server has the rest
    keeper, other = pool.upstream(maker), next(u for u in (pool.va, pool.vb) if u.name != maker)
    # The keeper restarted and lost its store: asked again at once with the whole request.
    keeper.responses.clear()
    response, served, attempts = await _turn(client, "m/vllm", "after a restart", response.id)
    assert (served, attempts) == (maker, "2")
    sent = keeper.requests[-1].body
    assert "previous_response_id" not in sent and len(sent["input"]) == 2 * 8 - 1
    # The keeper is down: the other server continues from the router's copy.
    keeper.knobs.fail_status = 503
    try:
        response, served, _ = await _turn(client, "m/vllm", "elsewhere", response.id)
    finally:
        keeper.knobs.fail_status = None
    assert served == other.name and response.output_text == f"{other.name}: elsewhere"
    sent = other.requests[-1].body
    assert "previous_response_id" not in sent and len(sent["input"]) == 2 * 9 - 1
    # From now on the conversation lives on the server that made its last response.
    _, served, attempts = await _turn(client, "m/vllm", "stay", response.id)
    assert (served, attempts) == (other.name, "1")


async def test_a_replica_off_the_store_node_reads_and_writes_through_the_actor(pool: Pool) -> None:
    """The ingress replicas here share the store actor's node and use its file; a replica on
    another node goes through the actor: both see the same conversations."""
    far = Conversations(lambda: responses_handle(REGISTRY), "test-far-replica", local=False)
    client = pool.client()
    first, _, _ = await _turn(client, "m/chat", "near")
    got = await far.get(first.id, pool.key_id)
    assert got["id"] == first.id and got["output"][0]["content"][0]["text"] == first.output_text
    with pytest.raises(RouterError) as info:
        await far.get(first.id, "another key")
    assert info.value.status == 404
    body = {"model": "m/chat", "input": "far", "previous_response_id": first.id}
    turn = await far.begin(orjson.dumps(body), pool.key_id)
    assert [i.get("role") for i in turn.items] == ["user", "assistant", "user"]
    answer = {"id": "resp_far_1", "object": "response", "status": "completed", "output": []}
    answer["output"] = [{"type": "message", "role": "assistant", "content": "from afar"}]
    head = Head(200, "application/json", {PROVIDER_HEADER: "c-oa"})
    await far.record(turn, Unary(head, orjson.dumps(answer)), lambda _: False)
    _, served, _ = await _turn(client, "m/chat", "back", "resp_far_1")
    assert _users(pool.upstream(served)) == ["near", "far", "back"]
    assert "from afar" in _said(pool.upstream(served), "assistant")
