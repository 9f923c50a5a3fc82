"""A router started without $LLM_ROUTER_ADMIN_TOKEN: every admin route answers 503
`admin_disabled` (never runs open), whatever the caller sends, while inference still works.

Its own `serve-router run`: the test session's Ray workers inherited the session's token when
they started, so only a new Ray can run without one."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from serve_app.api.auth import ADMIN_TOKEN_ENV
from serve_app.ingress.replica import api
from tests.conftest import free_port
from tests.local_router import run_command
from tests.test_local_run import Run, chat, runs  # noqa: F401 (runs: a fixture used here)

ADMIN_PREFIX = "/api/v1/"


def admin_routes() -> list[tuple[str, str]]:
    """(method, path) of every admin route in the app's own route table, path parameters
    filled in: a route added later is covered without touching this test."""
    found = [
        (method, re.sub(r"\{[^}]+\}", "x", route.path))
        for route in api.routes
        if isinstance(route, APIRoute) and route.path.startswith(ADMIN_PREFIX)
        for method in sorted(route.methods - {"HEAD"})
    ]
    assert len(found) >= 15, found  # the table was read (keys, adapters, config, status...)
    return found


@pytest.fixture
def without_token(
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    upstream_factory: Callable,
) -> Iterator[int]:
    """A router of its own, its environment without the admin token (`runs` copies os.environ
    when it is set up, so it is set up after the token is gone)."""
    monkeypatch.delenv(ADMIN_TOKEN_ENV)
    start: Callable[..., Run] = request.getfixturevalue("runs")
    port = free_port()
    run = start(run_command(port, upstream_factory("no-admin"), tmp_path))
    run.wait_ready()
    yield port
    run.ctrl_c()
    run.wait(30)


def _call(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    body = b"{}" if method in ("POST", "PUT") else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        method=method,
        headers={"content-type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_every_admin_route_is_503_admin_disabled(without_token: int) -> None:
    assert chat(without_token) == 200  # the router itself serves
    callers = {
        "no header": {},
        "a bearer token": {"authorization": "Bearer anything"},
        "an empty bearer": {"authorization": "Bearer "},
    }
    wrong = []
    for method, path in admin_routes():
        for who, headers in callers.items():
            status, doc = _call(without_token, method, path, headers)
            error = doc.get("error") if isinstance(doc, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            if (status, code) != (503, "admin_disabled"):
                wrong.append(f"{method} {path} ({who}): {status} {doc}")
    assert not wrong, "\n".join(wrong)
