"""The router in front of two real vLLM servers (CPU, tiny local model), through the official
`openai` client where one exists. Run by `make e2e`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.conftest import ADMIN, ROOT, wait_for
from tests.e2e.conftest import MODEL, models_config
from tests.e2e.vllm_server import MAX_MODEL_LEN, MODEL_DIR, SERVED_MODEL, VllmServer

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "hello there"}]


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_chat_and_completions_carry_the_upstreams_usage(
    router: str, vllm: list[VllmServer]
) -> None:
    raw = client(router).chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0
    )
    chat = raw.parse()
    assert raw.headers["x-router-provider"] in {s.name for s in vllm}
    assert chat.model == SERVED_MODEL  # vLLM's answer, passed back as it is
    _, direct = post(
        f"{vllm[0].url}/v1/chat/completions",
        {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0},
    )
    assert chat.usage is not None
    assert chat.usage.model_dump() | {"prompt_tokens_details": None} == direct["usage"] | {
        "prompt_tokens_details": None
    }
    assert chat.choices[0].message.content == direct["choices"][0]["message"]["content"]

    text = client(router).completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0
    )
    assert text.usage is not None and text.usage.prompt_tokens > 0
    assert 0 < text.usage.completion_tokens <= 5
    assert text.choices[0].text


def test_streams_end_with_the_usage_chunk_when_asked(router: str) -> None:
    chunks = list(
        client(router).chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].delta.content for c in chunks)

    pieces = list(
        client(router).completions.create(
            model=MODEL,
            prompt="The quick brown fox",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens > 0
    assert "".join(p.choices[0].text for p in pieces if p.choices)


def test_an_upstream_4xx_is_passed_back_as_it_is(router: str, vllm: list[VllmServer]) -> None:
    too_long = MAX_MODEL_LEN * 4
    with pytest.raises(openai.BadRequestError) as info:
        client(router).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=too_long)
    assert info.value.status_code == 400
    status, body = post(
        f"{router}/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": too_long}
    )
    direct_status, direct = post(
        f"{vllm[0].url}/v1/chat/completions",
        {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": too_long},
    )
    assert (status, body) == (direct_status, direct) == (400, direct)
    assert body["error"]["param"] == "max_tokens"


def test_metrics_show_attempts_on_both_providers(router: str, vllm: list[VllmServer]) -> None:
    for _ in range(6):
        client(router).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with urllib.request.urlopen(f"{router}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    for server in vllm:
        pattern = (
            rf'llm_router_upstream_attempts_total{{[^}}]*provider="{server.name}"[^}}]*}} (\d+)'
        )
        assert sum(float(n) for n in re.findall(pattern, text)) > 0, server.name
    statuses = re.findall(r'llm_router_requests_total{[^}]*status="(\d+)"', text)
    assert statuses and not any(s.startswith("5") for s in statuses)


def test_an_adapter_registered_through_the_registry_is_loaded_and_served(
    router: str, vllm: list[VllmServer]
) -> None:
    source = str(MODEL_DIR / "a1")
    status, answer = post(
        f"{router}/api/v1/adapters",
        {"name": "e2e-a1", "base_model": MODEL, "source": source},
        ADMIN,
    )
    assert status == 201, answer
    for server in vllm:
        listed = {m["id"]: m for m in get(f"{server.url}/v1/models")["data"]}
        assert listed["e2e-a1@v1"]["parent"] == SERVED_MODEL, server.name
        assert listed["e2e-a1@v1"]["root"] == source
    assert {"id": "e2e-a1", "parent": MODEL}.items() <= {
        m["id"]: m for m in get(f"{router}/v1/models")["data"]
    }["e2e-a1"].items()
    adapted = client(router).chat.completions.create(
        model="e2e-a1", messages=HELLO, max_tokens=12, temperature=0
    )
    assert adapted.model == "e2e-a1@v1"
    base = client(router).chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0
    )
    assert adapted.choices[0].message.content != base.choices[0].message.content


def test_provisioning_reports_what_the_real_servers_serve(
    vllm: list[VllmServer], tmp_path: Path
) -> None:
    config = models_config(vllm)
    config["vllm_models"]["e2e/absent"] = {
        "providers": [
            {**config["vllm_models"][MODEL]["providers"][0], "id": "absent", "model_path": "nope"}
        ]
    }
    config["active_models"]["vllm_models"].append("e2e/absent")
    roles = {
        "served": {"name": SERVED_MODEL, "provider": "vllm"},
        "absent": {"name": "nope", "provider": "vllm"},
    }
    (tmp_path / "models.json").write_text(json.dumps(config))
    (tmp_path / "profiles.json").write_text(
        json.dumps({"profiles": {"default": {"models": roles}}})
    )
    env = {
        **os.environ,
        "LLM_ROUTER_MODELS_CONFIG": str(tmp_path / "models.json"),
        "LLM_MODELS_CONFIG": str(tmp_path / "profiles.json"),
        "LLM_ADAPTER_REGISTRY_PATH": str(tmp_path / "registry.json"),
    }
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "scripts.provision_models", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = json.loads(done.stdout[done.stdout.index("{") :])
    by_role: dict[str, list[dict]] = {}
    for status in report["statuses"]:
        by_role.setdefault(status["role"], []).append(status)
    assert {s["action"] for s in by_role["served"]} == {"exists"}
    assert len(by_role["served"]) == len(vllm)
    (absent,) = by_role["absent"]
    assert absent["action"] == "error" and absent["detail"].startswith("missing_on_vllm")
    assert done.returncode == 1  # a role failed


def _served_by(router: str) -> str:
    """The provider that answered a short chat (x-router-provider)."""
    raw = client(router).chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=4
    )
    raw.parse()
    return raw.headers["x-router-provider"]


def _circuit(router: str, provider: str) -> float | None:
    with urllib.request.urlopen(f"{router}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    found = re.search(rf'llm_router_circuit_state{{provider="{provider}"}} ([\d.]+)', text)
    return None if found is None else float(found.group(1))


def test_kill_9_of_one_server_under_load_loses_nothing(router: str, vllm: list[VllmServer]) -> None:
    """Last in the module: it kills and restarts a server. 300 unary requests at concurrency 8;
    one server is killed (-9, with its engine) after the 50th answer. A unary request has no
    byte before its answer, so every one must be served (failover); the monitor opens that
    server's circuit; after a restart traffic reaches it again."""
    victim = vllm[1]
    served: list[str] = []
    failures: list[str] = []
    killed = threading.Event()

    def one(_: int) -> None:
        try:
            served.append(_served_by(router))
        except Exception as exc:
            failures.append(repr(exc))
        if len(served) >= 50 and not killed.is_set():
            killed.set()
            victim.kill()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(300)))
    assert killed.is_set()
    assert failures == [] and len(served) == 300
    assert served.count(vllm[0].name) > 150  # the survivor took over
    wait_for(lambda: _circuit(router, victim.name) == 2.0, 30, "the circuit to open")

    victim.start()
    victim.wait_ready()
    wait_for(lambda: _served_by(router) == victim.name, 120, "traffic to the restarted server")
