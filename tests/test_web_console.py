"""The operator console in a real headless browser (Debian's chromium driven by Playwright)
against a real router: one router and one browser for the module, a new tab per test."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from playwright import sync_api

from bench.browser import CHROMIUM, launch
from serve_app.demo.upstream import FakeUpstream, Knobs
from tests.conftest import ADMIN, ADMIN_TOKEN, deploy, free_port, lora_dir, provider, wait_for

pytestmark = pytest.mark.serve
expect = sync_api.expect

TYPE = "console_models"
# An absolute path or an outside address where the page names a file or calls the API (the
# SVG namespace URIs name no address).
ABSOLUTE = re.compile(r"""(src|href)="/|(fetch|api)\(["'`]/|https?://(?!www\.w3\.org/)""")
ROLE_MODEL = "console:1b"
# What the test's reverse proxy passes on, each way.
FORWARDED = frozenset({"authorization", "content-type", "content-security-policy", "location"})


@dataclass
class Router:
    url: str
    doomed: FakeUpstream  # the test that kills an upstream kills this one
    ollama: FakeUpstream
    config_file: Path
    config: dict


@pytest.fixture(scope="module")
def router(serve_url: str, upstream_factory, tmp_path_factory) -> Router:
    doomed, steady, spare = (upstream_factory(n) for n in ("con-a", "con-b", "con-sleep"))
    ollama = upstream_factory("con-ollama")
    ollama.knobs = Knobs(pull_step_s=0.3)  # a pull that takes a moment: progress shows first
    config = {
        TYPE: {
            "c/echo": {
                "providers": [
                    provider("con-a", doomed.url, api_token="sk-upstream-secret"),
                    provider("con-b", steady.url),
                ],
                "providers_sleep": [provider("con-sleep", spare.url)],
            },
            "c/llama": {
                "providers": [provider("con-ol", ollama.url, "ollama", model_path=ROLE_MODEL)]
            },
            "c/base": {"providers": [provider("con-vllm", steady.url, "vllm")]},
        },
        "active_models": {TYPE: ["c/echo", "c/llama", "c/base"]},
        "routing": {
            TYPE: {
                "health_check_interval_s": 0.3,
                "health_check_timeout_s": 0.5,
                "circuit_failures": 2,
                "circuit_cooldown_s": 60,
            }
        },
        "auth": {"require_keys": True},
    }
    folder = tmp_path_factory.mktemp("console")
    config_file = folder / "models-config.json"
    config_file.write_bytes(orjson.dumps(config))
    profiles = folder / "llm_models.json"
    profiles.write_bytes(
        orjson.dumps({"profiles": {"default": {"models": {"general": {"name": ROLE_MODEL}}}}})
    )
    deploy(serve_url, config, models_config=str(config_file), profiles_config=str(profiles))
    return Router(serve_url, doomed, ollama, config_file, config)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory) -> Iterator[object]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian's chromium is missing: apt-get install chromium (make test does)")
    with sync_api.sync_playwright() as p:
        context = launch(p, str(tmp_path_factory.mktemp("chromium-profile")))
        # Deadlines for what the page shows (each waits for its condition, no longer): room
        # for a 2-core machine busy with the router, Ray and the browser at once.
        context.set_default_timeout(15_000)
        expect.set_options(timeout=15_000)
        yield context
        context.close()


@pytest.fixture
def page(browser_context, router: Router) -> Iterator[object]:
    """A new tab, signed in (the token is kept per tab)."""
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{router.url}/console")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login button[type=submit]")
    expect(page.locator("#app")).to_be_visible()
    yield page
    page.close()
    assert not errors, errors


def _chat(url: str, key: str, model: str = "c/echo") -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=body.encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _call(
    url: str, method: str, path: str, body: bytes | None = None, **headers: str
) -> http.client.HTTPResponse | urllib.error.HTTPError:
    if body is not None:
        headers = {"content-type": "application/json", **headers}
    request = urllib.request.Request(url + path, data=body, method=method, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=20)
    except urllib.error.HTTPError as err:
        return err


def _admin_get(url: str, path: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url + path, headers=ADMIN), timeout=10) as r:
        return json.load(r)


def test_only_the_login_renders_without_the_token(browser_context, router: Router) -> None:
    page = browser_context.new_page()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(urllib.parse.urlsplit(request.url).path))
    page.goto(f"{router.url}/console")
    page.wait_for_load_state("networkidle")  # whatever the page would load by itself, it has
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    assert page.locator("[data-model]").count() == 0
    assert not [path for path in asked if "/api/" in path], asked  # no data asked for
    page.fill("#token", "not-the-token")
    page.click("#login button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("refused")
    page.wait_for_load_state("networkidle")
    expect(page.locator("#app")).to_be_hidden()
    assert page.locator("[data-model]").count() == 0
    page.close()


def test_every_url_of_the_page_is_relative(router: Router) -> None:
    """So the console works behind a proxy under a path prefix (`/prefix/console`)."""
    for name in ("console", "console/app.js", "console/app.css"):
        with urllib.request.urlopen(f"{router.url}/{name}", timeout=10) as resp:
            text = resp.read().decode()
            policy = _csp(resp.headers["content-security-policy"])
        # Only the page's own files run: no inline script or style, no eval, no other origin.
        assert policy["default-src"] == ["'self'"] and "script-src" not in policy, policy
        assert "style-src" not in policy and policy["frame-ancestors"] == ["'none'"], policy
        assert not re.search(
            r"""(src|href)="/|fetch\(["'`]/|api\(["'`]/|https?://(?!www\.w3)""", text
        )


def _csp(header: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header's directives and their sources."""
    directives = (part.split() for part in header.split(";") if part.strip())
    return {name: sources for name, *sources in directives}


@pytest.fixture(scope="module")
def prefixed(router: Router) -> Iterator[str]:
    """The router behind a reverse proxy that serves it under `/prefix` (on loopback)."""
    loop = asyncio.new_event_loop()
    port = free_port()

    async def forward(request: web.Request) -> web.Response:
        path = request.path_qs.removeprefix("/prefix")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                request.method, router.url + path, headers=headers, data=await request.read()
            ) as resp,
        ):
            body = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k.lower() in FORWARDED}
            return web.Response(status=resp.status, body=body, headers=kept)

    app = web.Application()
    app.router.add_route("*", "/prefix/{tail:.*}", forward)
    runner = web.AppRunner(app)
    ready = threading.Event()

    def serve() -> None:  # its own loop on its own thread: Playwright's runs on this one
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "the proxy did not start"
    yield f"http://127.0.0.1:{port}/prefix"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_the_console_works_under_a_path_prefix(browser_context, prefixed: str) -> None:
    page = browser_context.new_page()
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    page.goto(f"{prefixed}/console")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login button[type=submit]")
    expect(page.locator("[data-model='c/echo'] tr[data-provider=con-b]")).to_be_visible()
    assert asked and all(u.startswith(f"{prefixed}/") for u in asked), asked
    page.close()


def test_overview_shows_providers_and_an_upstream_killed_opens_its_circuit(
    page, router: Router
) -> None:
    echo = page.locator("[data-model='c/echo']")
    for pid in ("con-a", "con-b"):
        expect(echo.locator(f"tr[data-provider={pid}] [data-state=healthy]")).to_be_visible()
    expect(echo.locator("tr[data-provider=con-sleep] [data-state=sleeping]")).to_be_visible()
    router.doomed.stop_thread()
    expect(echo.locator("tr[data-provider=con-a] [data-state=open]")).to_be_visible(timeout=10_000)
    expect(echo.locator("tr[data-provider=con-a]")).to_contain_text("probe")  # why it opened
    expect(echo.locator("tr[data-provider=con-b] [data-state=healthy]")).to_be_visible()


def test_a_key_is_shown_once_works_and_is_refused_once_revoked(page, router: Router) -> None:
    page.click("nav a[data-view=keys]")
    page.fill("input[name=name]", "console-key")
    page.fill("input[name=rpm_limit]", "100")
    page.click("text=Create key")
    secret = page.locator("[data-secret]")
    expect(secret).to_contain_text("sk-sr-")
    key = secret.inner_text().strip()
    key_id = key.split("-")[2]
    row = page.locator(f"tr[data-key='{key_id}']")
    expect(row).to_contain_text("console-key")
    assert _chat(router.url, key) == 200
    # Gone after navigation, and never listed.
    page.click("nav a[data-view=overview]")
    page.click("nav a[data-view=keys]")
    expect(row).to_be_visible()
    assert page.locator("[data-secret]").count() == 0
    assert key not in page.content()
    # Its usage over the last hour, once the ingress has reported it.
    wait_for(
        lambda: _admin_get(router.url, f"/api/v1/keys/{key_id}/usage?window=1h")["models"],
        20,
        "the key's usage to be recorded",
    )
    row.locator("text=Usage").click()
    charts = page.locator(f"[data-usage='{key_id}'] figure")
    expect(charts).to_have_count(2)  # requests, tokens
    expect(charts.first).to_contain_text("c/echo: requests per minute")
    # Edit its limits.
    row.locator("text=Edit").click()
    page.locator("section:has-text('Edit console-key') input[name=rpm_limit]").fill("7")
    page.click("text=Save")
    wait_for(
        lambda: _admin_get(router.url, f"/api/v1/keys/{key_id}")["rpm_limit"] == 7,
        10,
        "the new limit",
    )
    expect(row.locator("td").nth(3)).to_have_text("7")
    # Revoke (two clicks), and the key is refused.
    row.locator("text=Revoke").click()
    row.locator("text=Confirm revoke").click()
    expect(row).to_have_count(0)
    assert _chat(router.url, key) == 401


def test_provisioning_streams_its_progress(page, router: Router) -> None:
    page.click("nav a[data-view=provisioning]")
    expect(page.locator("[data-profile]")).to_have_text("default")
    page.click("text=Ensure models")
    expect(page.locator("#provision-log [data-event=progress]").first).to_be_visible()
    expect(page.locator("#provision-log [data-event=done]")).to_be_visible()
    expect(page.locator("#provision-results tr[data-action=installed]")).to_contain_text("con-ol")
    assert ROLE_MODEL in router.ollama.pulled


def test_adapters_show_their_versions_and_where_they_are_loaded(page, router: Router) -> None:
    for version in (1, 2):
        body = orjson.dumps(
            {"base_model": "c/base", "name": "con-sql", "source": lora_dir(f"con-sql-{version}")}
        )
        with _call(router.url, "POST", "/api/v1/adapters", body, **ADMIN) as resp:
            assert resp.status == 201
    page.click("nav a[data-view=adapters]")
    card = page.locator("[data-adapter=con-sql]")
    expect(card).to_contain_text("version 2")
    expect(card.locator("tr", has_text="con-vllm")).to_contain_text("current")


def test_config_masks_tokens_and_a_bad_reload_says_why(page, router: Router) -> None:
    page.click("nav a[data-view=config]")
    shown = page.locator("#config-json")
    expect(shown).to_contain_text('"api_token": "***"')
    assert "sk-upstream-secret" not in page.content()
    router.config_file.write_text('{"console_models": {"c/echo": ')
    try:
        page.click("text=Reload from file")
        expect(page.locator("#reload-result.error")).to_contain_text("models-config.json")
    finally:
        router.config_file.write_bytes(orjson.dumps(router.config))
    page.click("text=Reload from file")
    expect(page.locator("#reload-result")).to_contain_text("version")
    expect(page.locator("#reload-result")).not_to_have_class("error")


def test_provisioning_streams_each_event_as_it_happens(router: Router) -> None:
    router.ollama.pulled.clear()  # pulled again from scratch (force: the role was ensured)
    events = []
    with _call(
        router.url, "POST", "/api/v1/models/provision?stream=true", b'{"force": true}', **ADMIN
    ) as resp:
        assert resp.headers["content-type"] == "application/x-ndjson"
        for line in resp:
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and len(events) == 2:
                # Read while the upstream is still pulling: nothing waited for the end.
                assert ROLE_MODEL not in router.ollama.pulled
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["status", "done"]
    assert kinds.count("progress") >= 4 and set(kinds) == {"start", "progress", "status", "done"}
    assert events[-1]["statuses"][0]["action"] == "installed"
    assert events[-2] == {"event": "status", **events[-1]["statuses"][0]}
    with _call(router.url, "POST", "/api/v1/models/provision", b"{}", **ADMIN) as resp:
        assert json.load(resp)["statuses"][0]["detail"] == "already_ensured"  # as before


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/api/v1/overview", None, 200),
        ("POST", "/api/v1/models/provision?stream=maybe", b"{}", 400),
        ("GET", "/api/v1/keys/0123456789abcdef/usage", None, 404),
        ("PUT", "/api/v1/keys/0123456789abcdef", b'{"name": "x"}', 404),
        ("GET", "/console/nothing.js", None, 404),
    ],
)
def test_the_console_endpoints_answer_4xx_in_the_api_shape(
    router: Router, method: str, path: str, body: bytes | None, status: int
) -> None:
    with _call(router.url, method, path, body, **ADMIN) as resp:
        assert resp.status == status
        if status >= 400:
            assert json.load(resp)["error"]["message"]
    if path.startswith("/api/") and status != 400:  # a bad query is refused before the token
        with _call(router.url, method, path, body) as resp:
            assert resp.status == 401


def test_bad_key_edits_and_windows_are_400(router: Router) -> None:
    with _call(router.url, "POST", "/api/v1/keys", b'{"name": "edited"}', **ADMIN) as resp:
        key_id = json.load(resp)["id"]
    for path, method, body in (
        (f"/api/v1/keys/{key_id}/usage?window=2d", "GET", None),
        (f"/api/v1/keys/{key_id}", "PUT", b'{"name": "x", "rpm_limit": 0}'),
        (f"/api/v1/keys/{key_id}", "PUT", b'{"name": "x", "secret": "y"}'),
    ):
        with _call(router.url, method, path, body, **ADMIN) as resp:
            assert resp.status == 400, path
    with _call(router.url, "PUT", f"/api/v1/keys/{key_id}", b'{"name": "y"}', **ADMIN) as resp:
        assert json.load(resp)["name"] == "y"
        assert "key" not in json.load(_call(router.url, "GET", f"/api/v1/keys/{key_id}", **ADMIN))


def test_hostile_strings_render_as_text(page, router: Router) -> None:
    """Markup in what operators and clients name (a key's models, an adapter's source, a
    provider's id beside its circuit's reason) is shown as text: no element is made of it and
    nothing of it runs (no dialog, no console error such as a CSP refusal). Key and adapter
    names refuse it outright."""
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    hostile = {
        what: f"<img src=x onerror=alert('{what}')>" for what in ("key", "adapter", "provider")
    }
    source = lora_dir("<svg onload=alert('source')>")
    # Names may hold no markup at all; a key's models and an adapter's source are free text.
    named = {
        "key": ("/api/v1/keys", {}),
        "adapter": ("/api/v1/adapters", {"base_model": "c/base", "source": source}),
    }
    for what, (path, fields) in named.items():
        body = orjson.dumps({**fields, "name": hostile[what]})
        with _call(router.url, "POST", path, body, **ADMIN) as resp:
            assert resp.status == 400, what
    body = orjson.dumps({"name": "hostile-models", "models": [hostile["key"]]})
    with _call(router.url, "POST", "/api/v1/keys", body, **ADMIN) as resp:
        key_id = json.load(resp)["id"]
    body = orjson.dumps({"base_model": "c/base", "name": "con-hostile", "source": source})
    with _call(router.url, "POST", "/api/v1/adapters", body, **ADMIN) as resp:
        assert resp.status == 201
    dead = provider(hostile["provider"], f"http://127.0.0.1:{free_port()}")
    config = {
        **router.config,
        TYPE: {**router.config[TYPE], "c/hostile": {"providers": [dead]}},
        "active_models": {TYPE: [*router.config["active_models"][TYPE], "c/hostile"]},
    }
    router.config_file.write_bytes(orjson.dumps(config))
    try:
        with _call(router.url, "POST", "/api/v1/config/reload", **ADMIN) as resp:
            assert resp.status == 200
        card = page.locator("[data-model='c/hostile']")
        expect(card).to_contain_text(hostile["provider"], timeout=15_000)
        expect(card).to_contain_text("probe", timeout=15_000)  # its circuit opened: why
        page.click("nav a[data-view=keys]")
        expect(page.locator(f"tr[data-key='{key_id}']")).to_contain_text(hostile["key"])
        page.click("nav a[data-view=adapters]")
        expect(page.locator("[data-adapter=con-hostile]")).to_contain_text(source)
        made = page.evaluate("document.querySelectorAll('img, [onerror], [onload]').length")
        assert made == 0 and dialogs == [] and errors == [], (made, dialogs, errors)
    finally:
        router.config_file.write_bytes(orjson.dumps(router.config))
        with _call(router.url, "POST", "/api/v1/config/reload", **ADMIN) as resp:
            assert resp.status == 200
        with _call(router.url, "DELETE", "/api/v1/adapters/con-hostile", **ADMIN) as resp:
            assert resp.status == 200
        with _call(router.url, "DELETE", f"/api/v1/keys/{key_id}", **ADMIN) as resp:
            assert resp.status in (200, 204)
