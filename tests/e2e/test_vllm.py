"""The router in front of two real vLLM servers (CPU, tiny local model), through the official
`openai` client where one exists. Run by `make e2e`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.conftest import ADMIN, ROOT, deploy, wait_for
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


def metrics(router: str) -> str:
    """The router's /metrics page (it needs the admin token)."""
    page = urllib.request.Request(f"{router}/metrics", headers=ADMIN)
    with urllib.request.urlopen(page, timeout=30) as resp:
        return resp.read().decode()


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


def test_streams_end_with_the_usage_chunk_when_asked(router: str, vllm: list[VllmServer]) -> None:
    def streamed(url: str, model: str) -> list:
        return list(
            client(url).chat.completions.create(
                model=model,
                messages=HELLO,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    def text(chunks: list) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    chunks, direct = streamed(router, MODEL), streamed(vllm[0].url, SERVED_MODEL)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage == direct[-1].usage  # the server's own counts, passed back
    assert text(chunks) and text(chunks) == text(direct)  # greedy: the same model, same words

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
    text = metrics(router)
    for server in vllm:
        pattern = (
            rf'llm_router_upstream_attempts_total{{[^}}]*provider="{server.name}"[^}}]*}} (\d+)'
        )
        assert sum(float(n) for n in re.findall(pattern, text)) > 0, server.name
    statuses = re.findall(r'llm_router_requests_total{[^}]*status="(\d+)"', text)
    assert statuses and not any(s.startswith("5") for s in statuses)


def test_the_monitor_reads_each_servers_load_gauges(router: str, vllm: list[VllmServer]) -> None:
    """The real /metrics page parses: running, waiting and KV use for every vLLM provider."""

    def providers() -> dict:
        req = urllib.request.Request(f"{router}/api/v1/providers/state", headers=ADMIN)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)["providers"]

    wait_for(lambda: all(providers()[s.name]["signals"] for s in vllm), 30, "load signals")
    for server in vllm:
        row = providers()[server.name]
        assert row["signals_error"] is None
        signals = row["signals"]
        assert signals["running"] >= 0 and signals["waiting"] >= 0
        assert 0 <= signals["kv_usage"] <= 1 and signals["loaded"] is None


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


def _listed(server: VllmServer) -> set[str]:
    """The model ids the server lists now (its base model and loaded adapters)."""
    return {m["id"] for m in get(f"{server.url}/v1/models")["data"]}


def _register(router: str, name: str, adapter: str) -> dict:
    status, answer = post(
        f"{router}/api/v1/adapters",
        {"name": name, "base_model": MODEL, "source": str(MODEL_DIR / adapter)},
        ADMIN,
    )
    assert status == 201 and answer["unconfirmed_replicas"] == [], answer
    return answer


def router_metric(router: str, name: str, **labels: str) -> float:
    """A metric of the router's /metrics summed over the label sets that have `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in metrics(router).splitlines():
        if line.startswith(name + "{") and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _attempts(router: str, provider: str, outcome: str) -> float:
    return router_metric(
        router, "llm_router_upstream_attempts_total", provider=provider, outcome=outcome
    )


def test_a_rolling_update_under_load_fails_nothing_and_unloads_the_old_version(
    router: str, vllm: list[VllmServer]
) -> None:
    """300 requests to the adapter at concurrency 8; v1 -> v2 after the 100th answer."""
    _register(router, "e2e-roll", "a1")
    served: list[tuple[float, str]] = []
    failures: list[str] = []
    acked: list[float] = []
    third = threading.Event()

    def one(_: int) -> None:
        sent = time.monotonic()
        try:
            answer = client(router).chat.completions.create(
                model="e2e-roll", messages=HELLO, max_tokens=4
            )
            served.append((sent, answer.model))
        except Exception as exc:
            failures.append(repr(exc))
        if len(served) >= 100:
            third.set()

    def update() -> None:
        third.wait(300)
        _register(router, "e2e-roll", "a2")
        acked.append(time.monotonic())

    updater = threading.Thread(target=update, daemon=True)
    updater.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(300)))
    updater.join(60)
    assert failures == [] and len(served) == 300
    after = [model for sent, model in served if sent > acked[0]]
    assert len(after) >= 50 and set(after) == {"e2e-roll@v2"}
    assert {model for _, model in served} == {"e2e-roll@v1", "e2e-roll@v2"}
    for server in vllm:
        wait_for(lambda s=server: "e2e-roll@v1" not in _listed(s), 30, f"v1 gone on {server.name}")
        assert "e2e-roll@v2" in _listed(server)


def test_a_deleted_adapter_answers_404_and_is_unloaded_everywhere(
    router: str, vllm: list[VllmServer]
) -> None:
    _register(router, "e2e-del", "a3")
    assert (
        client(router).chat.completions.create(model="e2e-del", messages=HELLO, max_tokens=2).model
        == "e2e-del@v1"
    )
    req = urllib.request.Request(
        f"{router}/api/v1/adapters/e2e-del", method="DELETE", headers=ADMIN
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    assert answer["unloading"] == ["e2e-del@v1"] and answer["unconfirmed_replicas"] == []
    with pytest.raises(openai.NotFoundError):
        client(router).chat.completions.create(model="e2e-del", messages=HELLO, max_tokens=2)
    for server in vllm:
        wait_for(lambda s=server: "e2e-del@v1" not in _listed(s), 30, f"unloaded on {server.name}")


class _AdapterLoad:
    """Requests to one adapter from a background thread until stopped: (status, provider)."""

    def __init__(self, router: str, name: str) -> None:
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(router, name), daemon=True)
        self._thread.start()

    def _run(self, router: str, name: str) -> None:
        while not self._stop.is_set():
            try:
                raw = client(router).chat.completions.with_raw_response.create(
                    model=name, messages=HELLO, max_tokens=2
                )
                raw.parse()
                self.results.append((raw.status_code, raw.headers["x-router-provider"]))
            except openai.APIStatusError as err:
                self.results.append((err.status_code, ""))
            except openai.APIError as err:
                self.results.append((0, repr(err)))

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        self._thread.join(120)
        return self.results


def test_a_provider_added_by_a_reload_gets_the_adapters_before_adapter_requests(
    serve_url: str, router: str, vllm: list[VllmServer], tmp_path: Path
) -> None:
    one, both = models_config(vllm[:1]), models_config(vllm)
    file = tmp_path / "models-config.json"
    file.write_text(json.dumps(one))
    deploy(serve_url, one, models_config=str(file))
    load: _AdapterLoad | None = None
    try:
        _register(router, "e2e-late", "a3")  # loaded on vllm-a only: vllm-b is not in the config
        assert "e2e-late@v1" not in _listed(vllm[1])
        load = _AdapterLoad(router, "e2e-late")
        file.write_text(json.dumps(both))
        status, answer = post(f"{router}/api/v1/config/reload", {}, ADMIN)
        assert status == 200 and answer["changed"], answer
        reloaded = time.monotonic()
        wait_for(lambda: "e2e-late@v1" in _listed(vllm[1]), 60, "e2e-late loaded on vllm-b")
        took = time.monotonic() - reloaded
        wait_for(lambda: vllm[1].name in {p for _, p in load.results[-20:]}, 30, "vllm-b serving")
    finally:
        results = [] if load is None else load.stop()
        deploy(serve_url, both)
    print(f"\nreload -> adapter listed on the added provider: {took:.1f} s")
    assert {status for status, _ in results} == {200}
    assert _attempts(router, vllm[1].name, "HTTP 404") == 0  # none sent there before its load


def _served_by(router: str) -> str:
    """The provider that answered a short chat (x-router-provider)."""
    raw = client(router).chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=4
    )
    raw.parse()
    return raw.headers["x-router-provider"]


def _circuit(router: str, provider: str) -> float | None:
    text = metrics(router)
    found = re.search(rf'llm_router_circuit_state{{provider="{provider}"}} ([\d.]+)', text)
    return None if found is None else float(found.group(1))


@pytest.mark.timeout(600)  # a vLLM restart on a busy CPU is most of it
def test_kill_9_of_one_server_under_load_loses_nothing(router: str, vllm: list[VllmServer]) -> None:
    """Last in the module: it kills and restarts a server. 300 requests at concurrency 8, every
    third one streamed; one server is killed (-9, with its engine) after the 50th answer. No
    request may fail that had not received its first byte (failover: at least one is answered
    on a second attempt), and only streams under way on that server may break; the monitor
    opens that server's circuit. After a restart the server gets the current adapters loaded
    again, and the adapter requests sent from its first answer on reach it only after that."""
    _register(router, "e2e-back", "a1")
    victim = vllm[1]
    served: list[str] = []
    attempts: list[int] = []
    failures: list[str] = []
    # (sent before the kill, from which provider) of each stream that broke after its head
    broken_mid_stream: list[tuple[bool, str, str]] = []
    killed = threading.Event()
    kill_once = threading.Lock()

    def one(i: int) -> None:
        sent_before_kill = not killed.is_set()
        try:
            raw = client(router).chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO, max_tokens=4, stream=i % 3 == 0
            )
        except Exception as exc:  # no answer at all: failover should have prevented it
            failures.append(repr(exc))
        else:
            provider = raw.headers["x-router-provider"]
            try:
                answer = raw.parse()
                if i % 3 == 0:
                    list(answer)  # a stream the router ends with an error event raises here
            except Exception as exc:
                broken_mid_stream.append((sent_before_kill, provider, repr(exc)))
            else:
                served.append(provider)
                attempts.append(int(raw.headers["x-router-attempts"]))
        with kill_once:
            if len(served) >= 50 and not killed.is_set():
                victim.kill()
                killed.set()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(300)))
    assert killed.is_set()
    assert failures == [] and len(served) + len(broken_mid_stream) == 300
    # Only a stream under way on the victim when it died may break: sent before the kill, its
    # head from the victim.
    assert all(p == victim.name and before for before, p, _ in broken_mid_stream), broken_mid_stream
    assert max(attempts) > 1  # some request failed on the victim and was answered by the other
    assert served.count(vllm[0].name) > 150  # the survivor took over
    wait_for(lambda: _circuit(router, victim.name) == 2.0, 30, "the circuit to open")

    victim.start()
    victim.wait_ready()  # polls every 0.5 s: what follows may be up to that much too short
    back = time.monotonic()
    # Adapter requests from the moment it answers (not while it starts: see VllmServer).
    load = _AdapterLoad(router, "e2e-back")
    try:
        wait_for(lambda: "e2e-back@v1" in _listed(victim), 60, "e2e-back loaded on it again")
        took = time.monotonic() - back
        wait_for(lambda: _served_by(router) == victim.name, 120, "traffic to the restarted server")
        wait_for(lambda: victim.name in {p for _, p in load.results[-20:]}, 30, "adapter traffic")
    finally:
        results = load.stop()
    print(
        f"\nrestart -> adapter listed again: {took:.1f} s; {len(broken_mid_stream)} streams broke;"
        f" {sum(a > 1 for a in attempts)} requests failed over"
    )
    assert {status for status, _ in results} == {200}
    assert _attempts(router, victim.name, "HTTP 404") == 0
