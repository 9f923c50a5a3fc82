"""Real Ray + Serve (started once per session), fake upstreams on loopback threads."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from serve_app.serve_env import apply_fast_serve_env

apply_fast_serve_env(single_node=True)  # before ray.serve is imported anywhere in this process

import aiohttp  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from serve_app.app import APP_NAME, router_app  # noqa: E402
from serve_app.config import parse_config  # noqa: E402
from serve_app.demo_upstream import FakeUpstream, Knobs  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def serve_url() -> Iterator[str]:
    port = free_port()
    ray.init(include_dashboard=False, logging_level="error", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()  # stops HAProxy too; it would outlive ray.shutdown otherwise
        ray.shutdown()


def deploy(serve_url: str, raw_config: dict, max_body_bytes: int = 64 * 1024) -> None:
    """Deploy (or replace) the router app and wait until HAProxy routes to it."""
    config = parse_config(raw_config, "test-config")
    serve.run(router_app(config, max_body_bytes), name=APP_NAME, route_prefix="/")
    expected = sorted(m for g in config.model_types.values() for m in g.models)

    def serving() -> bool:
        try:
            with urllib.request.urlopen(f"{serve_url}/v1/models", timeout=2) as resp:
                return sorted(m["id"] for m in json.load(resp)["data"]) == expected
        except OSError:
            return False

    wait_for(serving, 60, "the router to serve the new config")


@pytest.fixture(scope="session")
def upstream_factory() -> Iterator[Callable[[str], FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make(name: str) -> FakeUpstream:
        up = FakeUpstream(name, Knobs())
        up.start_in_thread()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop_thread()


def provider(pid: str, url: str, api_type: str = "openai", **extra: object) -> dict:
    return {
        "id": pid,
        "api_host": url,
        "api_token": "",
        "api_type": api_type,
        "input_size": 4096,
        "model_path": "",
        "keep_alive": None,
        "tool_calling": False,
        **extra,
    }


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
