"""What the console costs the router: the CPU of the Serve replicas and the actors they call
(`replica_cpu_s`: ingress, pickers, broker, monitor) under ~100 requests/s of the load
generator, without the console and with one console tab open on the Overview (Debian's
chromium, headless, polling every 2 s), in alternating rounds; and the CPU of one Overview poll,
from polls sent back to back without load (a steadier figure than the difference of two loaded
runs on a noisy two-core host). -> bench/console_cost.json.

    python -m bench.console_cost [--rate 100] [--duration 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from bench import loadgen
from bench.browser import launch
from bench.local_ray import demo_upstream, local_router, replica_cpu_s

TOKEN = "console-cost-admin-token-3b8e1f0a"
MODEL = "bench/echo"
POLL_S = 2.0  # the Overview's poll (serve_app/console/static/app.js, POLL_MS.overview)
RESULTS = Path(__file__).with_name("console_cost.json")


def _config(upstream: str) -> dict:
    providers = [
        {
            "id": f"cost-{i}",
            "api_host": upstream,
            "api_token": "",
            "api_type": "openai",
            "input_size": 8192,
            "model_path": "",
        }
        for i in range(2)
    ]
    return {
        "cost_models": {MODEL: {"providers": providers}},
        "active_models": {"cost_models": [MODEL]},
    }


def _cpu_since(before: dict[str, float]) -> dict[str, float]:
    after = replica_cpu_s()
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _per_poll(url: str, polls: int) -> dict[str, float]:
    """CPU ms of the app per Overview poll, by process kind, without other load: the CPU of
    `polls` polls sent back to back, less what the same processes use in as long idle (their
    own timers: probes, pushes, the broker's sweeps)."""
    request = urllib.request.Request(
        f"{url}/api/v1/overview", headers={"authorization": f"Bearer {TOKEN}"}
    )
    before, t0 = replica_cpu_s(), time.monotonic()
    for _ in range(polls):
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
    busy, wall = _cpu_since(before), time.monotonic() - t0
    before = replica_cpu_s()
    time.sleep(wall)
    idle = _cpu_since(before)
    return {k: round(max(0.0, v - idle.get(k, 0.0)) * 1000 / polls, 3) for k, v in busy.items()}


def _loaded(url: str, rate: float, duration: float, context: object | None) -> dict[str, float]:
    """App CPU (cores) and rate under the load, with a console tab open when `context`."""
    page = None
    if context is not None:
        page = context.new_page()
        page.goto(f"{url}/console")
        page.fill("#token", TOKEN)
        page.click("#login button[type=submit]")
        page.wait_for_selector(f"[data-model='{MODEL}'] svg", timeout=30_000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    before, t0 = replica_cpu_s(), time.monotonic()
    figures = loadgen.measure(
        f"{url}/v1/chat/completions", body, 8, duration, warmup=0.5, rate=rate
    )
    used, wall = _cpu_since(before), time.monotonic() - t0
    if page is not None:
        page.close()
    return {"rps": figures["rps"], "errors": figures["errors"], "cores": sum(used.values()) / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--polls", type=int, default=1000)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    os.environ["LLM_ROUTER_ADMIN_TOKEN"] = TOKEN  # the replicas read it (before Ray starts)
    with demo_upstream() as upstream, local_router("console-cost") as lr:
        lr.deploy(_config(upstream), "console-cost")
        _per_poll(lr.url, 20)  # warm
        per_poll = _per_poll(lr.url, args.polls)
        print("overview poll, CPU ms", orjson.dumps(per_poll).decode(), flush=True)
        runs: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            context = launch(p, profile)
            for _ in range(args.rounds):
                for case, ctx in (("without", None), ("with", context)):
                    runs[case].append(_loaded(lr.url, args.rate, args.duration, ctx))
                    print(case, orjson.dumps(runs[case][-1]).decode(), flush=True)
            context.close()
    cores = {case: statistics.median(r["cores"] for r in rs) for case, rs in runs.items()}
    poll_cores = sum(per_poll.values()) / 1000 / POLL_S
    report = {
        "machine": {"cpus": os.cpu_count()},
        "rate": args.rate,
        "duration_s": args.duration,
        "rounds": runs,
        "app_cores_median": {k: round(v, 4) for k, v in cores.items()},
        "difference_pct_of_app_cpu": round((cores["with"] / cores["without"] - 1) * 100, 2),
        "overview_poll_cpu_ms": per_poll,
        "overview_poll_s": POLL_S,
        "poll_pct_of_app_cpu_at_rate": round(poll_cores / cores["without"] * 100, 3),
    }
    RESULTS.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps(report).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
