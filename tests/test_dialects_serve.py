"""The Ollama, Responses and Anthropic dialects on real Serve, through the official clients
(`ollama`, `openai`, `anthropic`, unchanged), to providers of each api_type: vLLM-type takes
Responses and Messages natively, Ollama-type takes Ollama's API natively, the rest translated."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import anthropic
import ollama
import openai
import orjson
import pytest

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import ADMIN, JSON_TYPE, deploy, provider, until

pytestmark = pytest.mark.serve

TYPE = "dialect_models"


@dataclass
class Pool:
    url: str
    oa: FakeUpstream  # api_type openai
    ol: FakeUpstream  # api_type ollama
    vl: FakeUpstream  # api_type vllm
    bad: FakeUpstream  # always 500: m/two's primary (its sleeping provider answers)


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    oa, ol, vl, bad = (upstream_factory(n) for n in ("d-oa", "d-ol", "d-vl", "d-bad"))
    bad.knobs.fail_status = 500
    config = {
        TYPE: {
            "m/oa": {"providers": [provider("oa", oa.url, "openai")]},
            "m/ol": {"providers": [provider("ol", ol.url, "ollama", model_path="llama3.2:1b")]},
            "m/vl": {"providers": [provider("vl", vl.url, "vllm")]},
            # Every request tries `bad` first: the only primary, never cooling down or tripped.
            "m/two": {
                "providers": [provider("bad", bad.url, "openai")],
                "providers_sleep": [provider("oa2", oa.url)],
            },
        },
        "active_models": {TYPE: ["m/oa", "m/ol", "m/vl", "m/two"]},
        "routing": {TYPE: {"unhealthy_cooldown_s": 0.0, "circuit_failures": 1000}},
    }
    deploy(serve_url, config)
    return Pool(serve_url, oa, ol, vl, bad)


MODELS = [("m/oa", "oa"), ("m/ol", "ol"), ("m/vl", "vl")]


def _last(up: FakeUpstream) -> tuple[str, dict]:
    request = up.requests[-1]
    return request.path, request.body


# --- Ollama ---------------------------------------------------------------------------------------


async def test_ollama_client_lists_shows_and_chats_with_every_model(pool: Pool) -> None:
    client = ollama.AsyncClient(host=pool.url)
    listed = {m.model for m in (await client.list()).models}
    assert {"m/oa", "m/ol", "m/vl", "m/two"} <= listed
    shown = await client.show("m/oa")
    assert "completion" in (shown.capabilities or [])
    for model, name in MODELS:
        up = getattr(pool, name)
        answer = await client.chat(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=False
        )
        assert answer.message.content == f"{up.name}: hi" and answer.done
        assert answer.prompt_eval_count == 5 and (answer.eval_count or 0) >= 1
        parts = [
            part.message.content
            async for part in await client.chat(
                model=model, messages=[{"role": "user", "content": "yo"}], stream=True
            )
        ]
        assert "".join(parts) == f"{up.name}: yo" and len(parts) >= 3
    # To an Ollama provider the request goes as the client sent it, under the provider's name.
    await client.chat(
        model="m/ol",
        messages=[{"role": "user", "content": "x"}],
        think=True,
        keep_alive="3m",
        options={"num_ctx": 2048},
        stream=False,
    )
    path, body = _last(pool.ol)
    assert path == "/api/chat" and body["model"] == "llama3.2:1b"
    assert (body["think"], body["keep_alive"], body["options"]) == (True, "3m", {"num_ctx": 2048})
    # To an OpenAI-compatible provider it is a chat completion.
    await client.chat(
        model="m/oa", messages=[{"role": "user", "content": "x"}], options={"temperature": 0.1}
    )
    path, body = _last(pool.oa)
    assert path == "/v1/chat/completions" and body["temperature"] == 0.1


async def test_ollama_client_generates_and_embeds(pool: Pool) -> None:
    client = ollama.AsyncClient(host=pool.url)
    for model, name in MODELS:
        up = getattr(pool, name)
        generated = await client.generate(model=model, prompt="2+2", stream=False)
        assert generated.response == f"{up.name}: 2+2" and generated.done
        embedded = await client.embed(model=model, input=["a", "bb"])
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 0
    legacy = await client.embeddings(model="m/oa", prompt="a")
    assert len(legacy.embedding) > 0


async def test_ollama_errors_are_ollamas_shape(pool: Pool, http: aiohttp.ClientSession) -> None:
    client = ollama.AsyncClient(host=pool.url)
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="nope", messages=[{"role": "user", "content": "x"}], stream=False)
    assert info.value.status_code == 404 and "nope" in info.value.error
    for path, body, status in (
        ("/api/chat", b'{"messages": []}', 400),
        ("/api/chat", b"{not json", 400),
        ("/api/show", b'{"model": "nope"}', 404),
        ("/api/nothing", b"{}", 404),
    ):
        async with http.post(pool.url + path, data=body, headers=JSON_TYPE) as resp:
            doc = await resp.json()
            assert resp.status == status and isinstance(doc["error"], str) and len(doc) == 1


async def test_ollama_housekeeping_endpoints(pool: Pool, http: aiohttp.ClientSession) -> None:
    async with http.get(pool.url + "/") as resp:
        assert await resp.text() == "Ollama is running"
    async with http.head(pool.url + "/") as resp:
        assert resp.status == 200
    async with http.get(pool.url + "/api/version") as resp:
        assert (await resp.json())["version"]
    async with http.get(pool.url + "/api/ps") as resp:
        assert "m/oa" in {m["name"] for m in (await resp.json())["models"]}
    async with http.get(pool.url + "/ping") as resp:
        assert await resp.text() == "pong"


# --- OpenAI Responses ---------------------------------------------------------------------------


async def test_openai_client_responses_unary_and_streamed(pool: Pool) -> None:
    client = openai.AsyncOpenAI(base_url=pool.url + "/v1", api_key="unused")
    for model, name in MODELS:
        up = getattr(pool, name)
        response = await client.responses.create(model=model, input="hi", max_output_tokens=30)
        assert response.output_text == f"{up.name}: hi" and response.status == "completed"
        assert response.usage is not None and response.usage.input_tokens == 5
        stream = await client.responses.create(model=model, input="yo", stream=True)
        events = [event async for event in stream]
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == f"{up.name}: yo"
    assert _last(pool.vl)[0] == "/v1/responses"  # vLLM serves it natively
    assert _last(pool.oa)[0] == "/v1/chat/completions"


async def test_responses_an_unknown_previous_response_id_is_a_404(pool: Pool) -> None:
    client = openai.AsyncOpenAI(base_url=pool.url + "/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="m/oa", input="hi", previous_response_id="resp_1")
    assert isinstance(info.value.body, dict)
    assert (info.value.body["param"], info.value.body["code"]) == (
        "previous_response_id",
        "response_not_found",
    )


# --- Anthropic Messages --------------------------------------------------------------------------


async def test_anthropic_client_messages_unary_streamed_and_counted(pool: Pool) -> None:
    client = anthropic.AsyncAnthropic(base_url=pool.url, api_key="unused")
    for model, name in MODELS:
        up = getattr(pool, name)
        message = await client.messages.create(
            model=model,
            max_tokens=30,
            system="be brief",
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        )
        assert message.content[0].text == f"{up.name}: hi" and message.stop_reason == "end_turn"
        assert message.usage.input_tokens == 7  # the demo counts words: "be brief", "hi", and 4
        async with client.messages.stream(
            model=model, max_tokens=30, messages=[{"role": "user", "content": "yo"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == f"{up.name}: yo" and final.stop_reason == "end_turn"
        counted = await client.messages.count_tokens(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
        assert counted.input_tokens == 5
    assert _last(pool.vl)[0] == "/v1/messages/count_tokens"  # vLLM serves it natively
    path, body = _last(pool.ol)
    assert path == "/api/chat" and body["options"]["num_predict"] == 1


async def test_anthropic_errors_are_anthropics_shape(
    pool: Pool, http: aiohttp.ClientSession
) -> None:
    client = anthropic.AsyncAnthropic(base_url=pool.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    no_limit = {"model": "m/oa", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(pool.url + "/v1/messages", json=no_limit, headers=headers) as resp:
        doc = await resp.json()
    assert resp.status == 400 and doc["type"] == "error"
    assert (
        doc["error"]["type"] == "invalid_request_error" and "max_tokens" in doc["error"]["message"]
    )


# --- the same routing for every dialect ----------------------------------------------------------


async def test_every_dialect_fails_over_and_names_the_provider(
    pool: Pool, http: aiohttp.ClientSession
) -> None:
    calls = [
        (
            "/api/chat",
            {"model": "m/two", "stream": False, "messages": [{"role": "user", "content": "q"}]},
        ),
        ("/v1/responses", {"model": "m/two", "input": "q"}),
        (
            "/v1/messages",
            {"model": "m/two", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]},
        ),
        ("/api/chat", {"model": "m/two", "messages": [{"role": "user", "content": "q"}]}),
        (
            "/v1/messages",
            {
                "model": "m/two",
                "max_tokens": 5,
                "stream": True,
                "messages": [{"role": "user", "content": "q"}],
            },
        ),
    ]
    for path, body in calls:
        before = pool.bad.count()
        async with http.post(pool.url + path, json=body) as resp:
            await resp.read()
            assert resp.status == 200, (path, await resp.text())
            assert resp.headers["x-router-provider"] == "oa2"
        assert pool.bad.count() == before + 1  # tried first, failed, the next one answered
    async with http.post(pool.url + "/api/chat", json=calls[3][1]) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [orjson.loads(line) for line in (await resp.read()).splitlines()]
        assert lines[-1]["done"] is True

    async def labelled() -> bool:
        async with http.get(pool.url + "/metrics", headers=ADMIN) as resp:
            text = await resp.text()
        return all(f'api="{d}"' in text for d in ("ollama", "responses", "anthropic"))

    await until(labelled, "the dialects labelled in /metrics")
