"""`make chaos`: hostile clients do not take a replica down, and no secret reaches a log."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.conftest import (
    ADMIN,
    TOKEN_ENV,
    TOKEN_VALUE,
    deploy,
    free_port,
    provider,
)

pytestmark = [pytest.mark.serve, pytest.mark.chaos]


@pytest.fixture(scope="module")
def url(serve_url: str, upstream_factory) -> str:
    up = upstream_factory("hostile")
    token = "${" + TOKEN_ENV + "}"
    dead = f"http://127.0.0.1:{free_port()}"
    config = {
        "hostile_models": {
            "m/hostile": {"providers": [provider("hp", up.url, api_token=token)]},
            # The ingress calls upstreams with their tokens: a failing one must not show it.
            "m/dead": {"providers": [provider("dead", dead, api_token=token)]},
        },
        "active_models": {"hostile_models": ["m/hostile", "m/dead"]},
    }
    deploy(serve_url, config)
    return serve_url


async def _ok(http: aiohttp.ClientSession, url: str) -> None:
    body = {"model": "m/hostile", "messages": [{"role": "user", "content": "still there?"}]}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert "hostile: still there?" in await resp.text()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port
    return parts.hostname, parts.port


async def test_thousands_of_idle_connections_do_not_stop_service(url: str, http) -> None:
    host, port = _address(url)
    idle = []
    try:
        for _ in range(2000):
            _, writer = await asyncio.open_connection(host, port)
            idle.append(writer)
        for _ in range(5):
            await _ok(http, url)
    finally:
        for writer in idle:
            writer.close()


async def test_slow_loris_clients_do_not_stop_service(url: str, http) -> None:
    host, port = _address(url)
    loris = []
    try:
        for _ in range(200):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            loris.append(writer)
        for i in range(6):  # keep dribbling header bytes while real clients are served
            for writer in loris:
                with contextlib.suppress(ConnectionError):
                    writer.write(f"X-Slow-{i}: {'a' * 8}\r\n".encode())
            await _ok(http, url)
            await asyncio.sleep(0.2)
    finally:
        for writer in loris:
            writer.close()


async def test_a_huge_body_is_refused_early_and_the_replica_lives(url: str, http) -> None:
    async def endless() -> object:
        chunk = b"x" * 65536
        for _ in range(1600):  # 100 MiB, never all sent
            yield chunk

    async with http.post(
        f"{url}/v1/chat/completions", data=endless(), headers={"content-type": "application/json"}
    ) as resp:
        assert resp.status == 413
    host, port = _address(url)
    with socket.create_connection((host, port), timeout=5) as s:  # declared size, no body
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n"
        )
        assert s.recv(4096).split(b"\r\n", 1)[0].split()[1] in (b"413", b"400")
    await _ok(http, url)


async def test_no_secret_reaches_an_answer(url: str, http) -> None:
    """The upstream token travels to upstreams only: never in an answer, an error or the
    admin API. The token also goes through failures here (the session's end checks every log
    for it: tests/conftest.py)."""
    await _ok(http, url)  # the upstream got the token as a Bearer header...
    for stream in (False, True):  # ...and a dead one failed with it
        body = {"model": "m/dead", "messages": [{"role": "user", "content": "x"}], "stream": stream}
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 503
            assert TOKEN_VALUE not in await resp.text()
    for path in ("/api/v1/config", "/api/v1/providers/state"):
        async with http.get(f"{url}{path}", headers=ADMIN) as resp:
            assert resp.status == 200
            assert TOKEN_VALUE not in await resp.text()
