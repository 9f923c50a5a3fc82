"""Failover and cancellation against the real vLLM servers: a hung server's unary and streamed
requests are answered by the other one (x-router-provider, x-router-attempts and the attempts
metric's "timed out" outcome say so); a client that leaves stops the generation on the server,
unary and streamed (vLLM's own gauges and counters), and the provider's in-flight count at the
router comes back. Run by `make e2e`, after test_vllm.py (whose last test restarts a server)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.request

import pytest

from tests.conftest import deploy, wait_for
from tests.e2e.conftest import MODEL, MODEL_TYPE, models_config
from tests.e2e.test_vllm import HELLO, client, router_metric
from tests.e2e.vllm_server import VllmServer

pytestmark = pytest.mark.e2e
# Room for the tiny model's context (256) after the chat template and "hello there".
LONG = 200


def _server_metric(server: VllmServer, name: str) -> float:
    """A vLLM gauge or counter summed over its label sets (engines, finish reasons)."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as resp:
        page = resp.read().decode()
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", page, re.M)
    assert values, f"{name} is not on {server.name}'s /metrics page"  # renamed: no verdict
    return sum(float(v) for v in values)


def _hung_first(servers: list[VllmServer]) -> dict:
    """first_available: the first server is asked first whenever it is free; a hang costs one
    second; no health probe or circuit between the requests of the test."""
    config = models_config(servers)
    config["routing"] = {
        MODEL_TYPE: {
            "strategy": "first_available",
            "read_timeout_s": 1.0,
            "unhealthy_cooldown_s": 0,
            "circuit_failures": 100,
            "health_check_interval_s": 300,
        }
    }
    return config


def test_a_hung_server_is_failed_over_unary_and_streamed(
    serve_url: str, router: str, vllm: list[VllmServer]
) -> None:
    hung, other = vllm
    deploy(serve_url, _hung_first(vllm))
    try:
        # A replaced replica's totals leave the sums (after 15 s), so the baseline is of the one
        # outcome no earlier test gives this server: "timed out".
        timed_out = {"provider": hung.name, "outcome": "timed out"}
        tried = router_metric(router, "llm_router_upstream_attempts_total", **timed_out)
        hung.pause()
        try:
            unary = client(router).chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO, max_tokens=4, temperature=0
            )
            assert unary.parse().choices[0].message.content
            streamed = client(router).chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO, max_tokens=4, temperature=0, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
            assert text
        finally:
            hung.resume()
        for raw in (unary, streamed):
            assert (raw.headers["x-router-provider"], raw.headers["x-router-attempts"]) == (
                other.name,
                "2",
            )

        def counted() -> bool:  # pushed by the replicas each second: before they are replaced
            return (
                router_metric(router, "llm_router_upstream_attempts_total", **timed_out)
                >= tried + 2
            )

        wait_for(counted, 60, "the two timed-out attempts in the router's metrics")
    finally:
        deploy(serve_url, models_config(vllm))


def _leave_early(router: str, stream: bool) -> http.client.HTTPConnection:
    """A chat of LONG tokens (no early stop) that its client leaves: a streamed one after its
    first event, a unary one once a server runs it."""
    body = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": LONG,
        "ignore_eos": True,
        "temperature": 0,
        # 20 log-probabilities a token make the tiny model's 200 tokens take ~13 s instead of
        # ~1 s here: the request is surely still running when its client leaves.
        "logprobs": True,
        "top_logprobs": 20,
        "stream": stream,
    }
    host, port = router.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
    )
    return conn


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(
            False,
            marks=pytest.mark.xfail(
                reason="known defect found by this test: a unary request whose client leaves "
                "may run to its end on vLLM (all 200 tokens in ~13 s; 1 of 2 runs after the "
                "data-plane split, 4 of 6 before; vLLM called directly aborts at once; streams "
                "are cancelled every time). The ingress itself calls vLLM now, so what is left "
                "is whether the ingress replica learns in time that its client left while no "
                "byte is written (HAProxy -> replica), not the hop the upstream call used to take"
            ),
        ),
        pytest.param(
            True,
            marks=pytest.mark.xfail(
                reason="known defect (issue 34), seen in streams too: 3 of 7 runs on "
                "2026-12-07 (and the CI run before) relayed the stream to its end after its "
                "client left, vLLM generating all 200 tokens; "
                "the others were cancelled within the wait. Where the hang-up is lost "
                "(HAProxy -> the replica's HTTP server -> Serve's disconnect task) is not "
                "found yet"
            ),
        ),
    ],
    ids=["unary", "stream"],
)
def test_a_client_that_leaves_stops_the_generation_on_vllm(
    router: str, vllm: list[VllmServer], stream: bool
) -> None:
    generated = sum(_server_metric(s, "vllm:generation_tokens_total") for s in vllm)
    conn = _leave_early(router, stream)
    sock = conn.sock
    resp: http.client.HTTPResponse | None = None
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    else:
        wait_for(
            lambda: sum(_server_metric(s, "vllm:num_requests_running") for s in vllm) >= 1,
            60,
            "a server to run the request",
        )
    # The client leaves, as a process that exits does: its socket shut and its descriptor
    # closed. Closing the connection alone does neither while a response object still holds
    # the socket (http.client's file on it): the kernel then takes what comes in until its
    # buffer is full and HAProxy, seeing only a half-close, may relay the answer to its end.
    sock.shutdown(socket.SHUT_RDWR)
    if resp is not None:
        resp.close()
    conn.close()

    wait_for(
        lambda: sum(_server_metric(s, "vllm:num_requests_running") for s in vllm) == 0,
        60,
        "the servers to stop running it",
    )
    # Stopped before its end: fewer tokens made than it asked for (no end of text: ignore_eos).
    made = sum(_server_metric(s, "vllm:generation_tokens_total") for s in vllm) - generated
    assert 0 < made < LONG, made
    wait_for(
        lambda: all(
            router_metric(router, "llm_router_provider_in_flight", provider=s.name) == 0
            for s in vllm
        ),
        30,
        "the providers' in-flight counts to come back to 0",
    )
