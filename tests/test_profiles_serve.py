"""Roles on real Serve: a role name as `model`, its defaults, the pull before first use, and the
provisioning admin API."""

from __future__ import annotations

import orjson
import pytest

from serve_app.demo.upstream import FakeUpstream
from tests.conftest import ADMIN, deploy, provider

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def setup(serve_url: str, upstream_factory, tmp_path_factory) -> tuple[str, FakeUpstream]:
    ollama = upstream_factory("roles-ollama")
    config = {
        "role_models": {
            "m/auto": {"providers": [provider("ra", ollama.url, "ollama", model_path="auto:1b")]},
        },
        "active_models": {"role_models": ["m/auto"]},
    }
    profiles = {
        "profiles": {
            "default": {
                "models": {
                    "Chat": {"name": "auto:1b", "parameters": {"top_p": 0.25, "num_predict": 7}},
                    "cloud": {"name": "gpt-x", "provider": "openai"},
                }
            },
            "other": {"models": {"x": "y"}},
        }
    }
    file = tmp_path_factory.mktemp("profiles") / "llm_models.json"
    file.write_bytes(orjson.dumps(profiles))
    deploy(serve_url, config, profiles_config=str(file))
    return serve_url, ollama


async def _chat(http, url: str, model: str, **extra: object) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def test_a_role_is_a_model_with_defaults_and_is_pulled_before_first_use(setup, http) -> None:
    url, ollama = setup
    status, doc = await _chat(http, url, "CHAT")
    assert status == 200, doc
    assert ollama.count("/api/pull") == 1  # auto_download: pulled before the first request
    assert ollama.pulled == {"auto:1b"}
    sent = [r.body for r in ollama.requests if r.path == "/api/chat"][-1]
    assert sent["model"] == "auto:1b"
    assert sent["options"] == {"top_p": 0.25, "num_predict": 7}
    status, _ = await _chat(http, url, "chat", max_tokens=3, top_p=0.5)
    assert status == 200
    sent = [r.body for r in ollama.requests if r.path == "/api/chat"][-1]
    assert sent["options"] == {"top_p": 0.5, "num_predict": 3}  # the request's own win
    assert ollama.count("/api/pull") == 1  # once per replica


async def test_the_models_admin_api_shows_profiles_and_provisions(setup, http) -> None:
    url, _ = setup
    async with http.get(f"{url}/api/v1/models", headers=ADMIN) as resp:
        doc = await resp.json()
    assert doc["active_profile"] == "default" and doc["profiles"] == ["default", "other"]
    assert doc["roles"]["chat"]["model"] == "m/auto"
    assert doc["roles"]["chat"]["parameters"] == {"top_p": 0.25, "num_predict": 7}
    assert doc["roles"]["cloud"]["model"] is None

    async def provision(body: object) -> tuple[int, dict]:
        async with http.post(f"{url}/api/v1/models/provision", json=body, headers=ADMIN) as resp:
            return resp.status, await resp.json()

    status, report = await provision({"roles": ["chat", "cloud"], "force": True})
    assert status == 200
    actions = {s["role"]: (s["action"], s["detail"]) for s in report["statuses"]}
    assert actions["chat"][0] == "updated"
    assert actions["cloud"] == ("skipped", "unsupported_provider")
    status, report = await provision({"roles": ["chat"]})
    assert [(s["action"], s["detail"]) for s in report["statuses"]] == [
        ("skipped", "already_ensured")
    ]
    status, report = await provision({"roles": "chat"})
    assert status == 400 and report["error"]["code"] == "invalid_request"
    async with http.post(f"{url}/api/v1/models/provision", json={}) as resp:
        assert resp.status == 401


async def test_models_lists_the_roles_a_client_may_send(setup, http) -> None:
    url, _ = setup
    async with http.get(f"{url}/v1/models") as resp:
        listed = {m["id"]: m for m in (await resp.json())["data"]}
    assert listed["m/auto"]["owned_by"] == "role_models" and "root" not in listed["m/auto"]
    assert listed["chat"] == {
        "id": "chat",
        "object": "model",
        "created": 0,
        "owned_by": "role_models",
        "root": "m/auto",
    }
    assert "cloud" not in listed  # no configured model serves it: a client cannot use it
