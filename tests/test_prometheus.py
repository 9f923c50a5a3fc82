"""The Grafana dashboard against a real Prometheus (Debian's `prometheus`, started here on
loopback with its own storage): it scrapes the router and a vLLM-like upstream, and after some
traffic every query of deployments/grafana/serve-router.json returns data."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from serve_app.core.metrics import SPECS
from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, ROOT, deploy, free_port, provider, until, wait_for

pytestmark = pytest.mark.serve

DASHBOARD = ROOT / "deployments" / "grafana" / "serve-router.json"
# The vLLM gauges the monitor reads (routing/load.py), shown where Prometheus scrapes vLLM.
VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
# Grafana's variables as the test fills them: every value, a rate window of a few scrapes.
VARIABLES = {
    "$__rate_interval": "30s",
    "$model": ".*",
    "$provider": ".*",
    "$api": ".*",
    "$key_name": ".*",
}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) of every query, the variables filled in."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def test_the_dashboard_covers_every_family_and_uses_the_datasource_variable() -> None:
    dashboard = _dashboard()
    exprs = " ".join(e for _, e in _queries(dashboard))
    for name, spec in SPECS.items():
        exported = name if spec.kind != "counter" else f"{name}_total"
        assert re.search(rf"\b{re.escape(exported)}(_bucket|_sum|_count)?\b", exprs), name
    for gauge in VLLM_GAUGES:
        assert gauge in exprs
    assert "$" not in exprs  # every variable known
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"model", "provider", "api", "key_name"} <= set(variables)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


@dataclass
class Scraped:
    url: str  # the router
    prometheus: str
    vllm: FakeUpstream


@pytest.fixture(scope="module")
def scraped(serve_url: str, upstream_factory, tmp_path_factory) -> Iterator[Scraped]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (.ci/run installs it)")
    bad, vllm, queued, slot = (upstream_factory(n) for n in ("pr-bad", "pr-vllm", "pr-q", "pr-s"))
    bad.knobs = Knobs(fail_status=500)  # tried first, fails over: failovers and 5xx attempts
    queued.knobs = Knobs(latency_s=0.3)
    config = {
        "prom_models": {
            "p/chat": {
                "providers": [
                    provider("pr-bad", bad.url, weight=1),
                    provider("pr-vllm", vllm.url, "vllm", weight=0),
                ]
            },
            "p/queue": {"providers": [provider("pr-q", queued.url, max_concurrency=1)]},
        },
        "prom_slots": {"p/slot": {"providers": [provider("pr-s", slot.url)]}},
        "active_models": {"prom_models": ["p/chat", "p/queue"], "prom_slots": ["p/slot"]},
        "routing": {
            "prom_models": {"strategy": "weighted", "queue_timeout_s": 20},
            "prom_slots": {"strategy": "first_available"},
        },
        "auth": {"require_keys": True},
    }
    deploy(serve_url, config)
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    router_target = urllib.parse.urlsplit(serve_url).netloc
    vllm_target = urllib.parse.urlsplit(vllm.url).netloc
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: serve-router, static_configs: [{{targets: ['{router_target}']}}]}}\n"
        f"  - {{job_name: vllm, static_configs: [{{targets: ['{vllm_target}']}}]}}\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prometheus = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(prometheus), 30, "prometheus to be ready")
        yield Scraped(serve_url, prometheus, vllm)
    finally:
        proc.terminate()
        proc.wait(10)


def _ready(prometheus: str) -> bool:
    try:
        with urllib.request.urlopen(f"{prometheus}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


async def _key(http: aiohttp.ClientSession, url: str, name: str, **limits: object) -> str:
    async with http.post(f"{url}/api/v1/keys", json={"name": name, **limits}, headers=ADMIN) as r:
        assert r.status == 201
        return (await r.json())["key"]


async def _chat(http: aiohttp.ClientSession, url: str, key: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_every_dashboard_query_returns_data_after_traffic(scraped: Scraped, http) -> None:
    url = scraped.url
    key = await _key(http, url, "prom-team")
    limited = await _key(http, url, "prom-limited", rpm_limit=1)
    assert {await _chat(http, url, key, "p/chat") for _ in range(6)} == {200}
    queue = await asyncio.gather(*(_chat(http, url, key, "p/queue") for _ in range(4)))
    assert set(queue) == {200}
    assert {await _chat(http, url, key, "p/slot") for _ in range(3)} == {200}
    assert sorted([await _chat(http, url, limited, "p/chat") for _ in range(2)]) == [200, 429]
    scraped.vllm.knobs = Knobs(kv_usage=0.25)

    async def returns_data(expr: str) -> bool:
        query = urllib.parse.urlencode({"query": expr})
        async with http.get(f"{scraped.prometheus}/api/v1/query?{query}") as resp:
            doc = await resp.json()
            assert doc["status"] == "success", (expr, doc)
            return bool(doc["data"]["result"])

    for title, expr in _queries(_dashboard()):
        await until(lambda expr=expr: returns_data(expr), f"data for {title!r}: {expr}", 60)


def test_prometheus_scrapes_only_loopback(scraped: Scraped) -> None:
    with urllib.request.urlopen(f"{scraped.prometheus}/api/v1/targets", timeout=5) as resp:
        targets = json.load(resp)["data"]["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {"serve-router", "vllm"}
    assert all(t["scrapeUrl"].startswith("http://127.0.0.1:") for t in targets)
