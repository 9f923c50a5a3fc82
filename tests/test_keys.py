"""Client keys, limits and usage on real Serve with 2 ingress and 2 router replicas: exact
limits across replicas through the limiter actor's leases, revocation on every replica, usage
from the upstream's counts, nothing secret in the logs."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import ray
from multidict import CIMultiDict

from serve_app.access.limiter import limiter_handle, usage_path
from tests.conftest import ADMIN, REGISTRY, deploy, new_key, provider, until

pytestmark = pytest.mark.serve

TYPE = "keyed_models"
CHAT = [{"role": "user", "content": "q"}]


@pytest.fixture(scope="module")
def url(serve_url: str, upstream_factory) -> str:
    up = upstream_factory("keyed")
    config = {
        TYPE: {
            "m/a": {"providers": [provider("ka", up.url)]},
            "m/b": {"providers": [provider("kb", up.url)]},
        },
        "active_models": {TYPE: ["m/a", "m/b"]},
        "routing": {TYPE: {"num_replicas": 2}},
        "auth": {"require_keys": True},
    }
    deploy(serve_url, config, ingress_replicas=2)
    return serve_url


async def _chat(
    http: aiohttp.ClientSession, url: str, key: str | None, model: str = "m/a", **extra: object
) -> tuple[int, dict, CIMultiDict[str]]:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    body = {"model": model, "messages": CHAT, **extra}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.copy()


async def test_requests_need_a_known_key_allowed_the_model(url: str, http) -> None:
    status, doc, headers = await _chat(http, url, None)
    assert (status, doc["error"]["code"]) == (401, "missing_api_key")
    assert headers["www-authenticate"] == "Bearer"
    for value in ("Basic abc", "Bearer", "Bearer sk-sr-nothing"):
        async with http.post(
            f"{url}/v1/chat/completions",
            json={"model": "m/a", "messages": CHAT},
            headers={"authorization": value},
        ) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    async with http.post(
        f"{url}/v1/chat/completions",
        json={"model": "m/a", "messages": CHAT},
        headers={"authorization": "Bearer " + "x" * 8192},
    ) as resp:
        assert 400 <= resp.status < 500
    made = await new_key(http, url, models=["m/a"])
    assert made["key"].startswith("sk-sr-") and made["models"] == ["m/a"]
    assert (await _chat(http, url, made["key"]))[0] == 200
    status, doc, _ = await _chat(http, url, made["key"], "m/b")
    assert (status, doc["error"]["code"]) == (403, "model_not_allowed")
    # Anthropic's clients send x-api-key; errors come in Anthropic's shape.
    msg = {"model": "m/a", "max_tokens": 5, "messages": CHAT}
    async with http.post(f"{url}/v1/messages", json=msg, headers={"x-api-key": made["key"]}) as r:
        assert r.status == 200
    async with http.post(f"{url}/v1/messages", json=msg) as resp:
        doc = await resp.json()
        assert resp.status == 401 and doc["error"]["type"] == "authentication_error"
    expired = await new_key(http, url, expires_at=time.time() - 1)
    status, doc, _ = await _chat(http, url, expired["key"])
    assert (status, doc["error"]["code"]) == (401, "expired_api_key")


async def test_the_admin_api_never_shows_a_key_again(url: str, http) -> None:
    made = await new_key(http, url, rpm_limit=5)
    async with http.get(f"{url}/api/v1/keys", headers=ADMIN) as resp:
        text = await resp.text()
    assert made["id"] in text and made["key"] not in text and made["key"][-43:] not in text
    assert '"salt"' not in text and '"digest"' not in text
    async with http.get(f"{url}/api/v1/keys/{made['id']}", headers=ADMIN) as resp:
        shown = await resp.json()
    assert shown["rpm_limit"] == 5 and "key" not in shown and "usage" in shown
    async with http.get(f"{url}/api/v1/keys", headers={}) as resp:
        assert resp.status == 401
    for body, field in (
        ({"name": "x", "rpm_limit": 0}, "rpm_limit"),
        ({"name": "x", "budget_period": "2w"}, "budget_period"),
        ({"name": "x", "tpm_limit": "many"}, "tpm_limit"),
        ({}, "name"),
    ):
        async with http.post(f"{url}/api/v1/keys", json=body, headers=ADMIN) as resp:
            doc = await resp.json()
            assert resp.status == 400 and field in doc["error"]["message"], doc
    async with http.delete(f"{url}/api/v1/keys/0123456789abcdef", headers=ADMIN) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "key_not_found"


async def test_model_lists_need_a_key_and_show_only_its_models(url: str, http) -> None:
    for method, path in (("GET", "/v1/models"), ("GET", "/api/tags"), ("GET", "/api/ps")):
        async with http.request(method, f"{url}{path}") as resp:
            assert resp.status == 401, path
    async with http.post(f"{url}/api/show", json={"model": "m/a"}) as resp:
        assert resp.status == 401 and isinstance((await resp.json())["error"], str)  # Ollama's
    made = await new_key(http, url, models=["m/a"])
    key = {"authorization": f"Bearer {made['key']}"}
    async with http.get(f"{url}/v1/models", headers=key) as resp:
        doc = await resp.json()
        assert resp.status == 200, doc
        assert [m["id"] for m in doc["data"]] == ["m/a"]
    async with http.get(f"{url}/api/tags", headers=key) as resp:
        doc = await resp.json()
        assert resp.status == 200, doc
        assert [m["name"] for m in doc["models"]] == ["m/a"]
    async with http.post(f"{url}/api/show", json={"model": "m/a"}, headers=key) as resp:
        assert resp.status == 200
    async with http.post(f"{url}/api/show", json={"model": "m/b"}, headers=key) as resp:
        assert resp.status == 404  # another key's model is not named to this one
    async with http.get(f"{url}/v1/models", headers=ADMIN) as resp:
        assert {m["id"] for m in (await resp.json())["data"]} == {"m/a", "m/b"}


async def test_a_revoked_key_is_refused_by_every_replica_at_once(url: str, http) -> None:
    made = await new_key(http, url)
    assert {
        s for s, _, _ in await asyncio.gather(*(_chat(http, url, made["key"]) for _ in range(10)))
    } == {200}
    async with http.delete(f"{url}/api/v1/keys/{made['id']}", headers=ADMIN) as resp:
        doc = await resp.json()
        assert resp.status == 200 and doc["unconfirmed_replicas"] == []
    revoked = await asyncio.gather(*(_chat(http, url, made["key"]) for _ in range(20)))
    assert {status for status, _, _ in revoked} == {401}


async def _in_one_minute(seconds_needed: float) -> None:
    """Start where the limiter's minute window has room for the whole run."""
    left = 60 - time.time() % 60
    if left < seconds_needed:
        await asyncio.sleep(left + 0.05)


async def test_requests_per_minute_are_exact_across_replicas(url: str, http) -> None:
    for _ in range(2):  # a run that crosses the limiter's minute says nothing: once more
        made = await new_key(http, url, rpm_limit=60)
        await _in_one_minute(20)
        minute = int(time.time() // 60)
        results: list[tuple[int, dict, CIMultiDict[str]]] = []

        async def worker(key: str, results: list) -> None:  # until the limit refuses
            while not any(r[0] == 429 for r in results):
                assert len(results) < 500, "the limit never refused"
                results.append(await _chat(http, url, key))

        await asyncio.gather(*(worker(made["key"], results) for _ in range(8)))
        after = await asyncio.gather(*(_chat(http, url, made["key"]) for _ in range(20)))
        async with http.get(f"{url}/api/v1/keys/{made['id']}", headers=ADMIN) as resp:
            takers = (await resp.json())["usage"]["replicas_this_minute"]
        if int(time.time() // 60) == minute:
            break
    else:
        raise AssertionError("both runs crossed the limiter's minute")
    # together exactly the key's limit, and both ingress replicas spent of it
    statuses = [r[0] for r in results + list(after)]
    assert statuses.count(200) == 60 and set(statuses) == {200, 429}
    assert len(takers) == 2, takers
    refused = next(r for r in after if r[0] == 429)
    assert refused[1]["error"]["code"] == "rate_limit_exceeded"
    assert int(refused[2]["retry-after"]) >= 1
    assert refused[2]["x-ratelimit-limit-requests"] == "60"
    assert refused[2]["x-ratelimit-remaining-requests"] == "0"
    ok = next(r for r in results if r[0] == 200)
    assert ok[2]["x-ratelimit-limit-requests"] == "60" and "x-ratelimit-reset-requests" in ok[2]


async def test_tokens_per_minute_hold_within_one_request(url: str, http) -> None:
    for _ in range(2):  # a run that crosses the limiter's minute says nothing: once more
        made = await new_key(http, url, tpm_limit=200)
        await _in_one_minute(30)
        minute = int(time.time() // 60)
        used: list[int] = []
        while True:
            status, doc, headers = await _chat(http, url, made["key"])
            if status == 429:
                assert (
                    doc["error"]["code"] == "rate_limit_exceeded"
                    and "tokens" in doc["error"]["message"]
                )
                assert headers["x-ratelimit-limit-tokens"] == "200"
                break
            assert status == 200 and len(used) < 100, "the limit never refused"
            used.append(doc["usage"]["total_tokens"])
        if int(time.time() // 60) == minute:
            break
    else:
        raise AssertionError("two runs crossed the limiter's minute")
    # The last one admitted began under it; none was refused while one more fitted.
    assert sum(used[:-1]) < 200 < sum(used) + max(used), used


async def test_a_spent_budget_is_insufficient_quota(url: str, http) -> None:
    """One request after another (each answer settled before the next is sent): the budget
    holds within one request, whichever ingress replica each lands on."""
    made = await new_key(http, url, token_budget=30, budget_period="1d")
    used: list[int] = []
    for _ in range(10):
        status, doc, headers = await _chat(http, url, made["key"])
        if status == 429:
            assert doc["error"]["code"] == "insufficient_quota" and int(headers["retry-after"]) > 0
            break
        assert status == 200
        used.append(doc["usage"]["total_tokens"])
    else:
        raise AssertionError(f"the budget never refused: {used}")
    # The last one admitted began under it; none was refused while one more fitted.
    assert sum(used[:-1]) < 30 < sum(used) + max(used), used


async def test_usage_counts_the_upstreams_tokens_and_streams_keep_their_shape(
    url: str, http
) -> None:
    made = await new_key(http, url)
    expected = {"prompt": 0, "completion": 0}
    for _ in range(3):
        status, doc, _ = await _chat(http, url, made["key"])
        assert status == 200
        expected["prompt"] += doc["usage"]["prompt_tokens"]
        expected["completion"] += doc["usage"]["completion_tokens"]
    headers = {"authorization": f"Bearer {made['key']}"}
    body = {"model": "m/a", "messages": CHAT, "stream": True}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        streamed = await resp.read()
    assert b'"usage"' not in streamed and streamed.endswith(b"data: [DONE]\n\n")
    asked = body | {"stream_options": {"include_usage": True}}
    async with http.post(f"{url}/v1/chat/completions", json=asked, headers=headers) as resp:
        with_usage = await resp.read()
    assert b'"usage"' in with_usage
    expected["prompt"] += 2 * 5  # the demo upstream counts 5 prompt tokens, 4 pieces
    expected["completion"] += 2 * 4

    async def counted() -> bool:
        async with http.get(f"{url}/api/v1/keys/{made['id']}", headers=ADMIN) as resp:
            usage = (await resp.json())["usage"]["models"].get("m/a", {})
        return (
            usage.get("prompt") == expected["prompt"]
            and usage.get("completion") == expected["completion"]
        )

    await until(counted, "usage reported to the limiter")

    async def exported() -> bool:
        async with http.get(f"{url}/metrics", headers=ADMIN) as resp:
            text = await resp.text()
        labels = f'key_name="{made["name"]}",kind="prompt",model="m/a"'
        return f"llm_router_tokens_total{{{labels}}} {float(expected['prompt'])}" in text

    await until(exported, "llm_router_tokens_total")


async def test_keys_and_usage_survive_a_registry_and_limiter_kill(url: str, http) -> None:
    made = await new_key(http, url, token_budget=10_000)
    assert (await _chat(http, url, made["key"]))[0] == 200

    async def recorded() -> bool:
        async with http.get(f"{url}/api/v1/keys/{made['id']}", headers=ADMIN) as resp:
            return (await resp.json())["usage"]["models"].get("m/a", {}).get("requests") == 1

    await until(recorded, "the first request's usage")
    saved = usage_path(REGISTRY)

    async def written() -> bool:  # the limiter writes its file at most once a second
        return saved.exists() and made["id"].encode() in saved.read_bytes()

    await until(written, "the limiter's usage file")
    ray.kill(REGISTRY.handle(), no_restart=False)
    ray.kill(limiter_handle(REGISTRY), no_restart=False)

    async def back() -> bool:
        status, _, _ = await _chat(http, url, made["key"])
        if status != 200:
            return False
        async with http.get(f"{url}/api/v1/keys/{made['id']}", headers=ADMIN) as resp:
            if resp.status != 200:
                return False
            requests = (await resp.json())["usage"]["models"].get("m/a", {}).get("requests", 0)
        return requests >= 2

    await until(back, "the key and its usage after the kills", 60)
