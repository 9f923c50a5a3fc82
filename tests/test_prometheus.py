"""The Grafana dashboard against a real Prometheus (Debian's `prometheus`, started here on
loopback with its own storage): it scrapes the router and a vLLM-like upstream, and after some
traffic every query of deployments/grafana/serve-router.json returns data."""

from __future__ import annotations

import asyncio
import functools
import json
import math
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
from tests.conftest import ADMIN, ADMIN_TOKEN, ROOT, deploy, free_port, provider, until, wait_for

pytestmark = pytest.mark.serve

DASHBOARD = ROOT / "deployments" / "grafana" / "serve-router.json"
# The vLLM gauges the monitor reads (routing/load.py), shown where Prometheus scrapes vLLM.
VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
# Grafana's variables as the test fills them: every non-empty value (Grafana's `.*` would also
# match series that lack the label, hiding a query on the wrong label), and a rate window that
# spans the whole test (a rate over a window the traffic has left reads 0).
VARIABLES = {
    "$__rate_interval": "10m",
    "$model": ".+",
    "$provider": ".+",
    "$api": ".+",
    "$key_name": ".+",
}


# Rates this traffic cannot move (an ingress replica would have to die: tests/test_pickers.py
# covers that counter); their series must be there all the same.
STILL = {"Plans expired/s"}
# The KV-event panels: their series are there (a kv_aware model whose provider names KV events
# nobody publishes here); what moves them, a server publishing its KV events, is
# tests/test_kv_aware_serve.py's.
STILL |= {
    "KV event batches/s by kind",
    "kv_aware spills/s by model",
    "kv_aware predictions/s by result",
    "kv_aware cached tokens/s: predicted and reported",
    "KV event lag p99 by provider",
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
    slot: FakeUpstream


@pytest.fixture(scope="module")
def scraped(serve_url: str, upstream_factory, tmp_path_factory) -> Iterator[Scraped]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "Debian's prometheus is not installed: apt-get install prometheus (make test does)"
        )
    bad, vllm, queued, slot = (upstream_factory(n) for n in ("pr-bad", "pr-vllm", "pr-q", "pr-s"))
    bad.knobs = Knobs(fail_status=500)  # tried first, fails over: failovers and 5xx attempts
    queued.knobs = Knobs(latency_s=0.3)
    silent = {"endpoint": f"tcp://*:{free_port()}"}  # the engine would bind it; nobody does
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
        "prom_kv": {"p/kv": {"providers": [provider("pr-kv", vllm.url, "vllm", kv_events=silent)]}},
        "active_models": {
            "prom_models": ["p/chat", "p/queue"],
            "prom_slots": ["p/slot"],
            "prom_kv": ["p/kv"],
        },
        "routing": {
            "prom_models": {"strategy": "weighted", "queue_timeout_s": 20},
            "prom_slots": {"strategy": "first_available"},
            "prom_kv": {"strategy": "kv_aware"},
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
        # /metrics is the admin token's (it names every model, provider and key).
        f"  - {{job_name: serve-router, authorization: {{credentials: '{ADMIN_TOKEN}'}},\n"
        f"     static_configs: [{{targets: ['{router_target}']}}]}}\n"
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
        yield Scraped(serve_url, prometheus, vllm, slot)
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

    async def traffic() -> None:
        assert {await _chat(http, url, key, "p/chat") for _ in range(6)} == {200}
        queue = await asyncio.gather(*(_chat(http, url, key, "p/queue") for _ in range(4)))
        assert set(queue) == {200}
        assert {await _chat(http, url, key, "p/slot") for _ in range(3)} == {200}
        assert 429 in [await _chat(http, url, limited, "p/chat") for _ in range(2)]
        scraped.slot.knobs = Knobs(fail_status=400)  # a provider's own 4xx, passed back
        assert await _chat(http, url, key, "p/slot") == 400
        scraped.slot.knobs = Knobs()

    async def returns_data(title: str, expr: str, moved: bool) -> bool:
        """`moved`: a rate (or a quantile of rates) must be above 0, not only there."""
        values = [float(v) for _, v in (r["value"] for r in await _query(http, scraped, expr))]
        if moved and "rate(" in expr and title not in STILL:
            return any(v > 0 and math.isfinite(v) for v in values)
        return bool(values)

    # Prometheus counts a counter's moves between its scrapes, not the value it first sees:
    # once every series is there, the same traffic again must move every rate.
    await traffic()
    scraped.vllm.knobs = Knobs(kv_usage=0.25)
    for moved in (False, True):
        for title, expr in _queries(_dashboard()):
            check = functools.partial(returns_data, title, expr, moved)
            await until(check, f"data for {title!r} (moved: {moved}): {expr}", 60)
        if not moved:
            await traffic()
    # The variables' own queries (label_values) list what the traffic made.
    expected = {
        "model": {"p/chat", "p/queue", "p/slot"},
        "provider": {"pr-bad", "pr-vllm", "pr-q", "pr-s"},
        "api": {"openai"},
        "key_name": {"prom-team", "prom-limited"},
    }
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric, label = re.fullmatch(
            r"label_values\((\w+), *(\w+)\)", variable["query"]["query"]
        ).groups()
        query = urllib.parse.urlencode({"match[]": metric})
        async with http.get(f"{scraped.prometheus}/api/v1/label/{label}/values?{query}") as resp:
            values = set((await resp.json())["data"])
        assert expected[variable["name"]] <= values, (variable["name"], values)


async def _query(http: aiohttp.ClientSession, scraped: Scraped, expr: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": expr})
    async with http.get(f"{scraped.prometheus}/api/v1/query?{query}") as resp:
        doc = await resp.json()
    assert doc["status"] == "success", (expr, doc)
    return doc["data"]["result"]


async def test_prometheus_reads_every_page_it_scrapes(scraped: Scraped, http) -> None:
    """The router's /metrics (and the vLLM page the monitor reads) parse as Prometheus
    expects: each target up, with no scrape error."""

    async def all_up() -> bool:
        async with http.get(f"{scraped.prometheus}/api/v1/targets") as resp:
            targets = (await resp.json())["data"]["activeTargets"]
        assert {t["labels"]["job"] for t in targets} == {"serve-router", "vllm"}
        return all(t["health"] == "up" and not t["lastError"] for t in targets)

    await until(all_up, "every target scraped without error", 30)
