"""The router on real Ray Serve, with HAProxy, over loopback HTTP to fake upstreams."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict

from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import deploy, free_port, provider

pytestmark = pytest.mark.serve

from tests.conftest import TOKEN_ENV, TOKEN_VALUE  # noqa: E402


@dataclass
class Pool:
    url: str
    a: FakeUpstream
    b: FakeUpstream
    sleep: FakeUpstream
    small: FakeUpstream
    big: FakeUpstream
    w1: FakeUpstream
    w3: FakeUpstream
    ollama: FakeUpstream
    c1: FakeUpstream
    c2: FakeUpstream

    def all(self) -> list[FakeUpstream]:
        return [
            self.a,
            self.b,
            self.sleep,
            self.small,
            self.big,
            self.w1,
            self.w3,
            self.ollama,
            self.c1,
            self.c2,
        ]


@pytest.fixture(scope="module")
def pool(serve_url: str, upstream_factory) -> Pool:
    ups = {
        n: upstream_factory(n)
        for n in ("a", "b", "sleep", "small", "big", "w1", "w3", "ollama", "c1", "c2")
    }
    dead = f"http://127.0.0.1:{free_port()}"
    config = {
        "pool_models": {
            "m/failover": {
                "providers": [provider("a", ups["a"].url), provider("b", ups["b"].url + "/v1/")],
                "providers_sleep": [provider("sleep", ups["sleep"].url, weight=0.1)],
            },
            "m/dead-first": {"providers": [provider("dead", dead), provider("b2", ups["b"].url)]},
            "m/limited": {
                "providers": [provider("ra", ups["a"].url), provider("rb", ups["b"].url)],
                "providers_sleep": [provider("rs", ups["sleep"].url)],
            },
            "m/fit": {
                "providers": [
                    provider("small", ups["small"].url, input_size=50),
                    provider(
                        "big",
                        ups["big"].url,
                        api_type="vllm",
                        input_size="100000",
                        tool_calling=True,
                        model_path="org/big-model",
                        api_token="${" + TOKEN_ENV + "}",
                    ),
                ]
            },
        },
        "mixed_models": {
            "m/weighted": {
                "providers": [
                    provider("w1", ups["w1"].url, weight=1.0),
                    provider("w3", ups["w3"].url, weight=3.0),
                ]
            },
            "m/ollama": {
                "providers": [
                    provider(
                        "ollama",
                        ups["ollama"].url,
                        api_type="ollama",
                        model_path="llama3.2:1b",
                        keep_alive="35m",
                        tool_calling=True,
                    )
                ]
            },
            "m/cooldown": {
                "providers": [provider("c1", ups["c1"].url), provider("c2", ups["c2"].url)]
            },
        },
        "routing": {
            # These tests fail providers on purpose; circuits are tested in test_health.py.
            "default": {"circuit_failures": 1000},
            "pool_models": {"strategy": "first_available", "unhealthy_cooldown_s": 0},
            "mixed_models": {"strategy": "weighted_random", "unhealthy_cooldown_s": 60},
        },
        "active_models": {
            "pool_models": ["m/failover", "m/dead-first", "m/fit", "m/limited"],
            "mixed_models": ["m/weighted", "m/ollama", "m/cooldown"],
        },
    }
    deploy(serve_url, config, max_body_bytes=1_000_000)
    return Pool(serve_url, **ups)


@pytest.fixture(autouse=True)
def _fresh(pool: Pool) -> None:
    for up in pool.all():
        up.knobs = Knobs()
        up.requests.clear()
        up.disconnects = 0


def chat(model: str, text: str = "hello", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def post(
    http: aiohttp.ClientSession, url: str, body: object, path: str = "chat/completions"
) -> tuple[int, CIMultiDict[str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(
        f"{url}/v1/{path}", data=data, headers={"content-type": "application/json"}
    ) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


def sse_events(raw: bytes) -> list[object]:
    out: list[object] = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


# ---- serving and failover ---------------------------------------------------------------------


async def test_unary_chat_names_the_provider(pool: Pool, http) -> None:
    status, headers, body = await post(http, pool.url, chat("m/failover", "ping"))
    assert status == 200
    assert headers["x-router-provider"] == "a"
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "a: ping"
    assert headers["x-request-id"]


@pytest.mark.parametrize(
    "knobs",
    [
        Knobs(fail_status=500),
        Knobs(fail_status=503),
        Knobs(fail_status=429),
        Knobs(drop="before_headers"),
    ],
)
async def test_fails_over_to_the_next_provider(pool: Pool, http, knobs: Knobs) -> None:
    pool.a.knobs = knobs
    status, headers, body = await post(http, pool.url, chat("m/failover"))
    assert status == 200, body
    assert headers["x-router-provider"] == "b"
    assert headers["x-router-attempts"] == "2"
    assert pool.a.count() == 1 and pool.b.count() == 1


async def test_fails_over_past_a_refused_connection(pool: Pool, http) -> None:
    status, headers, _ = await post(http, pool.url, chat("m/dead-first"))
    assert status == 200
    assert headers["x-router-provider"] == "b2"


async def test_sleeping_provider_serves_only_when_primaries_fail(pool: Pool, http) -> None:
    status, headers, _ = await post(http, pool.url, chat("m/failover"))
    assert (status, headers["x-router-provider"]) == (200, "a") and pool.sleep.count() == 0
    pool.a.knobs = Knobs(fail_status=500)
    pool.b.knobs = Knobs(fail_status=502)
    status, headers, body = await post(http, pool.url, chat("m/failover", "late"))
    assert status == 200
    assert headers["x-router-provider"] == "sleep"
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "sleep: late"


async def test_all_failing_is_503_with_every_reason(pool: Pool, http) -> None:
    for up in (pool.a, pool.b, pool.sleep):
        up.knobs = Knobs(fail_status=500)
    status, _, body = await post(http, pool.url, chat("m/failover"))
    assert status == 503
    err = orjson.loads(body)["error"]
    assert err["code"] == "upstream_unavailable"
    assert all(pid in err["message"] for pid in ("a:", "b:", "sleep:"))


async def test_all_rate_limited_is_429_with_retry_after(pool: Pool, http) -> None:
    for up, wait in ((pool.a, "7"), (pool.b, "3"), (pool.sleep, "9")):
        up.knobs = Knobs(fail_status=429, retry_after=wait)
    status, headers, body = await post(http, pool.url, chat("m/limited"))
    assert status == 429
    assert headers["retry-after"] == "3"
    assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
    # Each provider is set aside for its own Retry-After: with all of them aside, the one that
    # comes back first is tried first (config order would pick ra).
    for up in (pool.a, pool.b, pool.sleep):
        up.knobs = Knobs()
    status, headers, _ = await post(http, pool.url, chat("m/limited"))
    assert (status, headers["x-router-provider"]) == (200, "rb")


async def test_upstream_4xx_is_passed_back_without_failover(pool: Pool, http) -> None:
    pool.a.knobs = Knobs(fail_status=400)
    status, headers, body = await post(http, pool.url, chat("m/failover"))
    assert status == 400
    assert orjson.loads(body)["error"]["message"] == "a failing on purpose"
    assert headers["x-router-provider"] == "a"
    assert pool.b.count() == 0


async def test_recent_failure_is_skipped_during_cooldown(pool: Pool, http) -> None:
    pool.c1.knobs = Knobs(fail_status=500)
    for _ in range(8):
        status, headers, _ = await post(http, pool.url, chat("m/cooldown"))
        assert status == 200 and headers["x-router-provider"] == "c2"
    assert pool.c1.count() <= 1


# ---- eligibility ------------------------------------------------------------------------------


async def test_large_prompt_goes_only_where_it_fits(pool: Pool, http) -> None:
    for _ in range(3):
        status, headers, _ = await post(http, pool.url, chat("m/fit", "x" * 400))
        assert status == 200 and headers["x-router-provider"] == "big"
    status, headers, _ = await post(http, pool.url, chat("m/fit", "short"))
    assert headers["x-router-provider"] == "small"
    assert pool.small.count() == 1


async def test_prompt_too_large_for_every_provider_is_400(pool: Pool, http) -> None:
    status, _, body = await post(http, pool.url, chat("m/fit", "y" * 420_000))
    assert status == 400
    assert orjson.loads(body)["error"]["code"] == "context_length_exceeded"
    status, _, body = await post(http, pool.url, chat("m/fit", "word " * 12_000))
    assert status == 200  # ~15k tokens fits the 100k provider
    assert pool.small.count() == 0


async def test_tools_go_only_to_tool_calling_providers(pool: Pool, http) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, headers, _ = await post(http, pool.url, chat("m/fit", "hi", tools=tools))
    assert status == 200 and headers["x-router-provider"] == "big"


async def test_model_path_and_token_reach_the_upstream(pool: Pool, http) -> None:
    await post(http, pool.url, chat("m/fit", "z" * 400))
    sent = pool.big.requests[0]
    assert sent.body["model"] == "org/big-model"
    assert sent.headers["Authorization"] == f"Bearer {TOKEN_VALUE}"
    assert sent.path == "/v1/chat/completions"
    await post(http, pool.url, chat("m/fit", "small one"))
    assert "Authorization" not in pool.small.requests[0].headers


async def test_weights_are_honoured(pool: Pool, http) -> None:
    n = 400

    async def one() -> str:
        _, headers, _ = await post(http, pool.url, chat("m/weighted"))
        return headers["x-router-provider"]

    counts: Counter[str] = Counter()
    for _ in range(n // 40):
        counts.update(await asyncio.gather(*(one() for _ in range(40))))
    # Expected 300 of 400 on w3; binomial sd ~8.7, so +-35 is about 4 sd.
    assert abs(counts["w3"] - 300) <= 35, counts
    assert counts["w1"] + counts["w3"] == n


# ---- streaming --------------------------------------------------------------------------------


async def test_stream_chunks_arrive_in_order(pool: Pool, http) -> None:
    pool.a.knobs = Knobs(chunks=12, chunk_delay_s=0.01)
    text = "the quick brown fox jumps over the lazy dog"
    status, headers, raw = await post(http, pool.url, chat("m/failover", text, stream=True))
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert len([p for p in pieces if p]) == 12
    assert "".join(pieces) == f"a: {text}"


async def test_stream_fails_over_before_the_first_byte(pool: Pool, http) -> None:
    pool.a.knobs = Knobs(fail_status=500)
    status, headers, raw = await post(http, pool.url, chat("m/failover", "s", stream=True))
    assert status == 200 and headers["x-router-provider"] == "b"
    assert sse_events(raw)[-1] == "[DONE]"


async def test_stream_fails_over_when_the_upstream_dies_between_headers_and_body(
    pool: Pool, http
) -> None:
    """Its 200 headers came, then the connection closed before any event: nothing reached the
    client yet, so the next provider answers it whole."""
    pool.a.knobs = Knobs(drop="mid_stream", drop_after_chunks=0)
    status, headers, raw = await post(http, pool.url, chat("m/failover", "s", stream=True))
    assert status == 200 and headers["x-router-provider"] == "b"
    assert headers["x-router-attempts"] == "2"
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events)
    assert pool.a.count() == 1 and pool.b.count() == 1


async def test_stream_broken_midway_ends_with_an_error_event(pool: Pool, http) -> None:
    pool.a.knobs = Knobs(drop="mid_stream", drop_after_chunks=2, chunks=6)
    status, _, raw = await post(http, pool.url, chat("m/failover", "abcdefghijkl", stream=True))
    assert status == 200
    events = sse_events(raw)
    assert "error" in events[-1]
    assert "[DONE]" not in events
    assert pool.b.count() == 0  # no failover once bytes went out


async def test_stream_error_before_any_byte_is_a_plain_http_error(pool: Pool, http) -> None:
    for up in (pool.a, pool.b, pool.sleep):
        up.knobs = Knobs(fail_status=500)
    status, headers, raw = await post(http, pool.url, chat("m/failover", stream=True))
    assert status == 503
    assert headers["content-type"].startswith("application/json")
    assert orjson.loads(raw)["error"]["code"] == "upstream_unavailable"


# ---- Ollama translation -----------------------------------------------------------------------


async def test_ollama_unary_both_ways(pool: Pool, http) -> None:
    status, _, body = await post(
        http, pool.url, chat("m/ollama", "hola", max_tokens=7, temperature=0.2, stop="END")
    )
    assert status == 200
    doc = orjson.loads(body)
    assert doc["object"] == "chat.completion" and doc["model"] == "m/ollama"
    assert doc["choices"][0]["message"]["content"] == "ollama: hola"
    assert doc["usage"]["prompt_tokens"] == 5
    sent = pool.ollama.requests[0]
    assert sent.path == "/api/chat"
    assert sent.body["model"] == "llama3.2:1b" and sent.body["keep_alive"] == "35m"
    assert sent.body["stream"] is False
    assert sent.body["options"] == {"num_predict": 7, "temperature": 0.2, "stop": ["END"]}


async def test_ollama_stream_both_ways(pool: Pool, http) -> None:
    pool.ollama.knobs = Knobs(chunks=5)
    body = chat("m/ollama", "streaming please", stream=True, stream_options={"include_usage": True})
    status, _, raw = await post(http, pool.url, body)
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 5
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == "ollama: streaming please"
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert pool.ollama.requests[0].body["stream"] is True


async def test_ollama_tool_calls_come_back_in_openai_shape(pool: Pool, http) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    status, _, body = await post(http, pool.url, chat("m/ollama", "find", tools=tools))
    assert status == 200
    choice = orjson.loads(body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup"
    assert orjson.loads(call["function"]["arguments"]) == {"echo": "ollama: find"}
    assert pool.ollama.requests[0].body["tools"] == tools


async def test_ollama_completions_and_embeddings(pool: Pool, http) -> None:
    status, _, body = await post(
        http, pool.url, {"model": "m/ollama", "prompt": "once"}, "completions"
    )
    assert status == 200 and orjson.loads(body)["choices"][0]["text"] == "ollama: once"
    status, _, body = await post(
        http, pool.url, {"model": "m/ollama", "input": ["a", "bb"]}, "embeddings"
    )
    doc = orjson.loads(body)
    assert status == 200 and [d["index"] for d in doc["data"]] == [0, 1]
    assert [r.path for r in pool.ollama.requests] == ["/api/generate", "/api/embed"]


# ---- the official openai client -----------------------------------------------------------------


def test_openai_client_sync_and_streaming(pool: Pool) -> None:
    client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key="unused", max_retries=0)
    done = client.chat.completions.create(
        model="m/failover", messages=[{"role": "user", "content": "sdk"}]
    )
    assert done.choices[0].message.content == "a: sdk"
    stream = client.chat.completions.create(
        model="m/ollama", stream=True, messages=[{"role": "user", "content": "sdk stream"}]
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == "ollama: sdk stream"
    )
    emb = client.embeddings.create(model="m/failover", input="vector")
    assert len(emb.data[0].embedding) == 8
    assert [m.id for m in client.models.list()] == [
        "m/failover",
        "m/dead-first",
        "m/fit",
        "m/limited",
        "m/weighted",
        "m/ollama",
        "m/cooldown",
    ]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe\x00garbage", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (
            orjson.dumps({"messages": [{"role": "user", "content": "x"}]}),
            400,
            "missing_required_parameter",
        ),
        (orjson.dumps({"model": "m/failover"}), 400, "missing_required_parameter"),
        (orjson.dumps({"model": "m/failover", "messages": "hi"}), 400, "invalid_value"),
        (orjson.dumps({"model": "m/failover", "messages": []}), 400, "invalid_value"),
        (orjson.dumps({**chat("m/failover"), "stream": "yes"}), 400, "invalid_value"),
        (
            orjson.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_value",
        ),
        (orjson.dumps(chat("no/such-model")), 404, "model_not_found"),
        (b"[" * 1_100_000, 413, "request_too_large"),
        (orjson.dumps(chat("m/failover", "q" * 1_100_000)), 413, "request_too_large"),
    ],
)
async def test_bad_input_gets_an_openai_error(
    pool: Pool, http, body: bytes, status: int, code: str
) -> None:
    got, headers, raw = await post(http, pool.url, body)
    assert got == status, raw
    assert headers["content-type"] == "application/json"
    err = orjson.loads(raw)["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert pool.a.count() == 0


async def test_unknown_model_message_quotes_at_most_256_characters(pool: Pool, http) -> None:
    name = "n" * 100_000
    status, _, raw = await post(http, pool.url, orjson.dumps(chat(name)))
    message = orjson.loads(raw)["error"]["message"]
    assert status == 404
    assert f"'{'n' * 256}'..." in message and "n" * 257 not in message


async def test_deeply_nested_json_is_a_400(pool: Pool, http) -> None:
    nested = b'{"model":"m/failover","messages":' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, raw = await post(http, pool.url, nested)
    assert status == 400 and orjson.loads(raw)["error"]["type"] == "invalid_request_error"


async def test_unknown_route_and_method_are_openai_errors(pool: Pool, http) -> None:
    async with http.get(f"{pool.url}/v1/nothing") as resp:
        assert resp.status == 404 and "error" in await resp.json()
    async with http.get(f"{pool.url}/v1/chat/completions") as resp:
        assert resp.status == 405 and "error" in await resp.json()
    async with http.get(f"{pool.url}/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_concurrent_unary_calls_each_get_their_own_answer(pool: Pool, http) -> None:
    for up in (pool.a, pool.b):  # keep calls in flight together so trips are shared
        up.knobs = Knobs(latency_s=0.02)

    async def one(i: int) -> None:
        status, headers, body = await post(http, pool.url, chat("m/failover", f"prompt-{i}"))
        assert status == 200
        content = orjson.loads(body)["choices"][0]["message"]["content"]
        assert content == f"{headers['x-router-provider']}: prompt-{i}"

    await asyncio.gather(*(one(i) for i in range(64)))
    # first_available: one request at a time on a and b, the overflow on the sleeping provider
    assert pool.a.peak == pool.b.peak == 1
    assert pool.a.count() + pool.b.count() + pool.sleep.count() == 64


async def test_client_leaving_a_stream_cancels_the_upstream_call(pool: Pool, http) -> None:
    # ~100 s of streaming if left alone: a stream that ran to its end is no disconnect
    pool.a.knobs = Knobs(chunks=2000, chunk_delay_s=0.05)
    body = orjson.dumps(chat("m/failover", "x" * 4000, stream=True))
    async with http.post(
        f"{pool.url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    ) as resp:
        assert resp.status == 200
        await resp.content.readany()  # the stream has started
    # the client hung up; the upstream sees the router go away, long before the stream's end
    await asyncio.wait_for(_until(lambda: pool.a.disconnects == 1 and pool.a.active == 0), 30)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)
