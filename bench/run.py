"""Direct-to-upstream vs through-the-router, unary and streaming, at concurrency 1 and 32;
and the cost of the client dialects (Ollama `/api/chat`, Anthropic `/v1/messages`, translated
for the OpenAI-type upstream) over the OpenAI path through the router, unary at concurrency 1.

Starts the demo upstream (zero latency), Ray, Serve and the router with the fast settings,
runs each case in a separate load-generator process, writes bench/results.json and prints it.
With --strategies, the cases run once per strategy (the app redeployed with it as the default,
in --rounds interleaved rounds) and the report compares each with `balanced`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson

from bench import loadgen
from bench.local_ray import demo_upstream, local_router, replica_cpu_s

MODEL = "bench/echo"
BENCH_ADMIN_TOKEN = "bench-admin-token-7a1f3e9d2c4b6a80"
RESULTS = Path(__file__).with_name("results.json")


def _config(upstream: str, strategy: str | None, count: int, keys: bool = False) -> dict:
    providers = [
        {
            "id": f"bench-upstream-{i}",
            "api_host": upstream,
            "api_token": "",
            "api_type": "openai",
            "input_size": 8192,
            "model_path": "",
            "keep_alive": None,
            "tool_calling": False,
            "nworkers": 2,
        }
        for i in range(count)
    ]
    config: dict = {
        "bench_models": {MODEL: {"providers": providers}},
        "active_models": {"bench_models": [MODEL]},
    }
    if strategy:
        config["routing"] = {"bench_models": {"strategy": strategy}}
    if keys:
        config["auth"] = {"require_keys": True}
    return config


def _cases(
    router_url: str, upstream_url: str, cases: list[str], duration: float
) -> dict[str, dict]:
    message = [{"role": "user", "content": "Say hello to the benchmark."}]
    results: dict[str, dict] = {}
    for kind, extra in (("unary", {}), ("stream", {"stream": True})):
        body = {"model": MODEL, "messages": message, **extra}
        for c in (1, 32):
            if f"{kind}_c{c}" not in cases:
                continue
            direct = loadgen.measure(f"{upstream_url}/v1/chat/completions", body, c, duration)
            cpu_before = replica_cpu_s()
            routed = loadgen.measure(f"{router_url}/v1/chat/completions", body, c, duration)
            cpu_after = replica_cpu_s()
            case = {
                "direct": direct,
                "router": routed,
                "cpu_ms_per_request": {
                    kind: round(
                        (cpu_after[kind] - cpu_before.get(kind, 0.0))
                        * 1000
                        / max(1, routed["requests"]),
                        3,
                    )
                    for kind in cpu_after
                },
                "added_p50_ms": round(routed["p50_ms"] - direct["p50_ms"], 3),
                "rps_ratio": round(routed["rps"] / direct["rps"], 3),
            }
            if kind == "stream":
                case["added_ttfb_p50_ms"] = round(routed["ttfb_p50_ms"] - direct["ttfb_p50_ms"], 3)
            results[f"{kind}_c{c}"] = case
            print(kind, f"c={c}", orjson.dumps(case).decode(), flush=True)
    return results


# The same question in each dialect, unary: the OpenAI path is the reference.
_DIALECTS = {
    "openai": ("/v1/chat/completions", {}),
    "ollama": ("/api/chat", {"stream": False}),
    "anthropic": ("/v1/messages", {"max_tokens": 64}),
}


def _dialects(router_url: str, duration: float, rounds: int) -> dict:
    """Added p50 of each dialect over the OpenAI path at c=1, median of interleaved rounds
    (each round's figures against the same round's OpenAI run)."""
    message = [{"role": "user", "content": "Say hello to the benchmark."}]
    p50s: dict[str, list[float]] = {name: [] for name in _DIALECTS}
    for _ in range(rounds):
        for name, (path, extra) in _DIALECTS.items():
            body = {"model": MODEL, "messages": message, **extra}
            run = loadgen.measure(f"{router_url}{path}", body, 1, duration)
            assert run["errors"] == 0, (name, run)
            p50s[name].append(run["p50_ms"])
    out = {
        name: {
            "p50_ms": round(statistics.median(values), 3),
            "added_p50_ms": round(
                statistics.median(v - o for v, o in zip(values, p50s["openai"], strict=True)), 3
            ),
        }
        for name, values in p50s.items()
    }
    print("dialects c=1", orjson.dumps(out).decode(), flush=True)
    return out


def _keys(deploy: Callable[[bool], None], router_url: str, duration: float, rounds: int) -> dict:
    """Unary at c=1 and c=32 with keys required (a key with request and token limits, so its
    leases are taken and renewed) and without, in rounds whose order alternates; medians of
    each round's keyed figures against the same round's open ones, and the ingress CPU time
    per request at c=32."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
    admin = {"authorization": f"Bearer {BENCH_ADMIN_TOKEN}", "content-type": "application/json"}
    url = f"{router_url}/v1/chat/completions"

    def measure(keys: bool) -> dict:
        deploy(keys)
        auth = None
        if keys:
            limits = {"name": "bench", "rpm_limit": 10_000_000, "tpm_limit": 10_000_000_000}
            req = urllib.request.Request(
                f"{router_url}/api/v1/keys", data=orjson.dumps(limits), headers=admin
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                auth = {"authorization": f"Bearer {orjson.loads(resp.read())['key']}"}
        c1 = loadgen.measure(url, body, 1, duration, auth)
        before = replica_cpu_s()
        c32 = loadgen.measure(url, body, 32, duration, auth)
        after = replica_cpu_s()
        assert c1["errors"] == c32["errors"] == 0, (c1, c32)
        cpu = {k: (after[k] - before.get(k, 0.0)) * 1000 / max(1, c32["requests"]) for k in after}
        return {"c1": c1, "c32": c32, "cpu_ms_per_request_c32": cpu}

    extra_p50: list[float] = []
    share: list[float] = []
    extra_cpu: list[float] = []
    for i in range(rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        runs = {keys: measure(keys) for keys in order}
        opened, keyed = runs[False], runs[True]
        extra_p50.append(keyed["c1"]["p50_ms"] - opened["c1"]["p50_ms"])
        share.append(keyed["c32"]["rps"] / opened["c32"]["rps"])
        extra_cpu.append(
            keyed["cpu_ms_per_request_c32"]["ingress"] - opened["cpu_ms_per_request_c32"]["ingress"]
        )
        print("keys round", orjson.dumps({"open": opened, "keyed": keyed}).decode(), flush=True)
    out = {
        "c1_extra_p50_ms": round(statistics.median(extra_p50), 3),
        "c32_rps_share": round(statistics.median(share), 3),
        "c32_extra_ingress_cpu_ms_per_request": round(statistics.median(extra_cpu), 3),
        "rounds": {"c1_extra_p50_ms": extra_p50, "c32_rps_share": share, "extra_cpu": extra_cpu},
    }
    print("keys", orjson.dumps(out).decode(), flush=True)
    return out


def _versus_balanced(runs: dict[str, list[dict[str, dict]]]) -> dict[str, dict]:
    """Per strategy, the median over rounds of: added p50 at c=1 minus balanced's, and
    throughput at c=32 as a share of balanced's (each round against the same round's)."""
    base = runs.get("balanced")
    if not base:
        return {}
    out: dict[str, dict] = {}
    for name, rounds in runs.items():
        extra_p50, share = [], []
        for mine, theirs in zip(rounds, base, strict=True):
            if "unary_c1" in mine:
                extra_p50.append(
                    mine["unary_c1"]["added_p50_ms"] - theirs["unary_c1"]["added_p50_ms"]
                )
            if "unary_c32" in mine:
                share.append(
                    mine["unary_c32"]["router"]["rps"] / theirs["unary_c32"]["router"]["rps"]
                )
        out[name] = {
            "c1_extra_p50_ms": round(statistics.median(extra_p50), 3) if extra_p50 else None,
            "c32_rps_share": round(statistics.median(share), 3) if share else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per case")
    parser.add_argument("--chunks", type=int, default=50, help="SSE events per streamed answer")
    parser.add_argument(
        "--cases",
        default="unary_c1,unary_c32,stream_c1,stream_c32,dialects_c1,keys",
        help="comma-separated subset of the cases",
    )
    parser.add_argument(
        "--strategies",
        default="",
        help="comma-separated strategies to compare (include balanced, the reference)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of strategies")
    parser.add_argument(
        "--keys-rounds", type=int, default=4, help="alternating rounds of the keys case"
    )
    parser.add_argument(
        "--providers",
        type=int,
        default=1,
        help="providers of the model, all on the one upstream (with --strategies use enough "
        "that first_available* are not capped below the concurrency: 40)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="keep everything up this many seconds after the cases (profiling)",
    )
    args = parser.parse_args(argv)

    os.environ["LLM_ROUTER_ADMIN_TOKEN"] = BENCH_ADMIN_TOKEN  # for the keys case (before Ray)
    strategies: list[str | None] = [s for s in args.strategies.split(",") if s] or [None]
    runs: dict[str, list[dict[str, dict]]] = {}
    with demo_upstream("--chunks", str(args.chunks)) as upstream_url, local_router("bench") as lr:
        router_url = lr.url
        print("router at", router_url, flush=True)
        for _ in range(args.rounds):
            for strategy in strategies:
                lr.deploy(_config(upstream_url, strategy, args.providers), "bench")
                print("strategy", strategy or "(default)", flush=True)
                results = _cases(router_url, upstream_url, args.cases.split(","), args.duration)
                if "dialects_c1" in args.cases.split(","):
                    results["dialects_c1"] = _dialects(router_url, args.duration, 3)
                if "keys" in args.cases.split(","):

                    def deploy(keys: bool, strategy: str | None = strategy) -> None:
                        lr.deploy(_config(upstream_url, strategy, args.providers, keys), "bench")

                    results["keys"] = _keys(deploy, router_url, args.duration, args.keys_rounds)
                runs.setdefault(strategy or "default", []).append(results)
        report = {
            "machine": {"cpus": os.cpu_count()},
            "duration_s": args.duration,
            "stream_chunks": args.chunks,
            "providers": args.providers,
            "results": runs["default"][0] if "default" in runs else runs,
            "versus_balanced": _versus_balanced(runs),
        }
        RESULTS.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        print(orjson.dumps(report["versus_balanced"], option=orjson.OPT_INDENT_2).decode())
        time.sleep(args.hold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
