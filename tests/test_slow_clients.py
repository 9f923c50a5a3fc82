"""Hostile clients at the router's door, on a `serve-router run` of its own (real HAProxy, as
serve-router-haproxy rewrites Serve's config): a client that trickles its headers is dropped
at `timeout http-request` while others are served, a stream silent for longer than `timeout
client` is not cut, and wrong admin tokens from one address are throttled whatever
`X-Forwarded-For` it sends.

HAProxy's client timeout is 2 s here and the request deadline 4 s: a client that sends a byte
about every half second is never idle for 2 s, so only the request deadline can drop it.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message

import pytest

from serve_app.demo.upstream import FakeUpstream
from serve_app.local.haproxy import REQUEST_TIMEOUT_ENV
from tests.conftest import ADMIN_TOKEN, free_port, wait_for
from tests.local_router import run_command
from tests.test_local_run import CHAT, chat, run_starter

CLIENT_TIMEOUT_S = 2
REQUEST_TIMEOUT_S = 4
# Long past both, so a client still connected then was not dropped by either.
DROPPED_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("doors")
    up.start_in_thread()
    yield up
    up.stop_thread()


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[int]:
    folder = tmp_path_factory.mktemp("slow-clients")
    port = free_port()
    timeouts = {
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(CLIENT_TIMEOUT_S),
        REQUEST_TIMEOUT_ENV: str(REQUEST_TIMEOUT_S),
    }
    with run_starter(folder) as start:
        run = start(run_command(port, upstream, folder), **timeouts)
        run.wait_ready()
        yield port
        run.ctrl_c()
        run.wait(30)


class Trickler:
    """A client that sends `sent` at once, then `trickled` a byte per step (each step waits up to
    0.5 s for an answer), until the server closes the connection."""

    def __init__(self, port: int, sent: bytes, trickled: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(sent)
        self.sock.settimeout(0.5)
        self.left = trickled
        self.answer = b""
        self.closed = False

    def step(self) -> bool:
        """Send the next byte; read what came back. True once the server closed."""
        if self.left and not self.answer:
            try:
                self.sock.sendall(self.left[:1])
                self.left = self.left[1:]
            except OSError:  # reset: closed
                self.closed = True
                return True
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return False
        except OSError:
            self.closed = True
            return True
        self.answer += data
        self.closed = not data
        return self.closed


SLOW_HEADER = b"X-Slow: " + b"a" * 200


def test_a_client_trickling_its_headers_is_dropped_while_others_are_served(router: int) -> None:
    slow = Trickler(router, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n", SLOW_HEADER)
    try:
        served = chat(router)  # while it holds its connection
        wait_for(slow.step, DROPPED_WITHIN_S, "the server to close the trickling connection")
    finally:
        slow.sock.close()
    assert served == 200
    assert slow.left, "its whole request was sent: the deadline did not drop it"
    assert slow.answer.startswith(b"HTTP/1.1 408"), slow.answer[:200]
    assert chat(router) == 200


def test_a_stream_silent_past_the_client_timeout_goes_on(
    router: int, upstream: FakeUpstream
) -> None:
    upstream.knobs.hold_mid_stream = True
    stream = urllib.request.Request(
        f"http://127.0.0.1:{router}/v1/chat/completions",
        data=json.dumps({**CHAT, "stream": True}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(stream, timeout=DROPPED_WITHIN_S) as resp:
        first = resp.readline()
        assert first.startswith(b"data: "), first
        # The stream is silent now. A trickler connected after this point is dropped at the
        # request deadline, so once it is, the stream has been silent past the client timeout.
        clock = Trickler(router, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n", SLOW_HEADER)
        try:
            wait_for(clock.step, DROPPED_WITHIN_S, "the request deadline to pass")
        finally:
            clock.sock.close()
        upstream.release()
        rest = resp.read()
    assert rest.rstrip().endswith(b"data: [DONE]"), rest[-300:]


def _admin(port: int, token: str, forwarded_for: str) -> tuple[int, dict, Message]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/keys",
        headers={"authorization": f"Bearer {token}", "x-forwarded-for": forwarded_for},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), err.headers


def test_wrong_admin_tokens_are_throttled_per_address_whatever_it_claims(router: int) -> None:
    # Ten wrong tokens, each claiming another address; HAProxy appends the real one.
    for i in range(10):
        status, doc, _ = _admin(router, "wrong-" + "x" * 40, f"10.0.0.{i}")
        assert (status, doc["error"]["code"]) == (403, "invalid_admin_token")
    status, doc, headers = _admin(router, ADMIN_TOKEN, "10.0.0.99")
    assert (status, doc.get("error", {}).get("code")) == (429, "admin_throttled"), doc
    assert 1 <= int(headers.get("retry-after", "0")) <= 60
    assert ADMIN_TOKEN not in json.dumps(doc)
    assert chat(router) == 200  # inference is not held back
