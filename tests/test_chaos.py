"""`make chaos`: steady load while upstreams die, hang, fail and come back (not in `make test`).

Every request must end with a 200 or a clear error a client could retry (never the client's own
timeout: the router answers past its deadline), and at least 99% must succeed while one provider
stays healthy. The figures go to
`bench/chaos.json` and stdout.

Faults (seconds into a paced 20 s run at 200 requests/s): 3 k1 killed, 6 k2 hangs, 9 k3 answers
500, 12 k1 restarted on its port, 15 k2 and k3 healed; k4 stays healthy throughout.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from serve_app.demo.upstream import Knobs
from tests.conftest import deploy, provider

pytestmark = [pytest.mark.serve, pytest.mark.chaos]

DURATION_S = 20.0
RATE = 200  # requests per second, paced: about 4000 requests in all
CONCURRENCY = 16
DEADLINE_S = 10.0
RETRYABLE = {429, 502, 503, 504}
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "chaos.json"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def test_chaos_keeps_serving(serve_url: str, upstream_factory) -> None:
    ups = {n: upstream_factory(n) for n in ("k1", "k2", "k3", "k4")}
    config = {
        "chaos_models": {
            "m/chaos": {"providers": [provider(n, up.url) for n, up in ups.items()]},
        },
        "active_models": {"chaos_models": ["m/chaos"]},
        "routing": {
            "chaos_models": {
                "strategy": "least_in_flight",
                "num_replicas": 2,
                "max_attempts": 4,
                "read_timeout_s": 1.0,  # a hung upstream costs one second, then failover
                "request_timeout_s": DEADLINE_S,
                "health_check_interval_s": 0.5,
                "health_check_timeout_s": 0.5,
                "circuit_failures": 3,
                "circuit_cooldown_s": 2.0,
            }
        },
    }
    deploy(serve_url, config)
    results: list[tuple[float, float, int, str]] = []  # start, seconds, status, error code
    faults: list[tuple[float, str]] = []
    k1_port = ups["k1"].port
    k1_calls: list[int] = []

    def fault(what: str) -> None:
        faults.append((time.monotonic(), what))

    def heal() -> None:
        ups["k2"].knobs, ups["k3"].knobs = Knobs(), Knobs()
        fault("k2, k3 healed")

    def k1_back() -> None:
        ups["k1"].start_in_thread(port=k1_port)
        k1_calls.append(ups["k1"].calls)
        fault("k1 back")

    schedule = [
        (3.0, lambda: (ups["k1"].stop_thread(), fault("k1 killed"))),
        (6.0, lambda: (setattr(ups["k2"].knobs, "hang", True), fault("k2 hangs"))),
        (9.0, lambda: (setattr(ups["k3"], "knobs", Knobs(fail_status=500)), fault("k3 500s"))),
        (12.0, k1_back),
        (15.0, heal),
    ]
    body = {"model": "m/chaos", "messages": [{"role": "user", "content": "chaos"}]}
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S + 10)

    async def one(http: aiohttp.ClientSession) -> None:
        started = time.monotonic()
        try:
            async with http.post(f"{serve_url}/v1/chat/completions", json=body) as resp:
                doc = await resp.json(content_type=None)
                code = "" if resp.status == 200 else (doc.get("error") or {}).get("code") or "?"
                results.append((started, time.monotonic() - started, resp.status, code))
        except (aiohttp.ClientError, TimeoutError) as exc:
            results.append((started, time.monotonic() - started, 0, type(exc).__name__))

    async def worker(http: aiohttp.ClientSession, begin: float, offset: float) -> None:
        at = begin + offset
        while at < begin + DURATION_S:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            await one(http)
            at += CONCURRENCY / RATE

    async def faults_on_time(begin: float) -> None:
        for offset, action in schedule:
            await asyncio.sleep(max(0.0, begin + offset - time.monotonic()))
            await asyncio.to_thread(action)

    async with aiohttp.ClientSession(timeout=timeout) as http:
        started = time.monotonic()
        await asyncio.gather(
            faults_on_time(started),
            *(worker(http, started, i / RATE) for i in range(CONCURRENCY)),
        )
        elapsed = time.monotonic() - started

    failed = [r for r in results if r[2] != 200]
    fault_start, fault_end = faults[0][0], faults[-1][0]
    during = [r[1] for r in results if fault_start <= r[0] <= fault_end]
    report = {
        "requests": len(results),
        "succeeded": len(results) - len(failed),
        "failed": len(failed),
        "success_rate": round((len(results) - len(failed)) / len(results), 5),
        "failures_by_status_code": {
            f"{s} {c}": sum(1 for r in failed if (r[2], r[3]) == (s, c))
            for s, c in sorted({(r[2], r[3]) for r in failed})
        },
        "elapsed_s": round(elapsed, 1),
        "rps": round(len(results) / elapsed, 1),
        "p50_ms": round(_percentile([r[1] for r in results], 0.5) * 1000, 1),
        "p99_ms": round(_percentile([r[1] for r in results], 0.99) * 1000, 1),
        "during_faults": {
            "requests": len(during),
            "p50_ms": round(_percentile(during, 0.5) * 1000, 1),
            "p99_ms": round(_percentile(during, 0.99) * 1000, 1),
            "max_ms": round(max(during, default=0) * 1000, 1),
        },
        "max_ms": round(max(r[1] for r in results) * 1000, 1),
        "faults": [f"+{at - started:.1f}s {what}" for at, what in faults],
        "served_by": {n: up.calls for n, up in ups.items()},
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("\nchaos:", json.dumps(report, indent=2))

    # The load spanned every fault: requests started after each one.
    assert all(any(r[0] > at for r in results) for at, _ in faults), faults
    # Every request got the router's answer, none the client's own timeout (DEADLINE_S + 10):
    # failures are retryable statuses with an error code (the longest wait is in the report).
    assert all(r[2] in RETRYABLE and r[3] != "?" for r in failed), failed[:5]
    assert report["success_rate"] >= 0.99
    assert ups["k1"].calls > k1_calls[0], "k1 never served again after it came back"
