"""`make bench-stream`: paced streams straight to the demo upstream and through the router, in
the same run; writes bench/stream.json.

The demo upstream streams each answer as `--tokens` events `--pace-ms` apart (a model's
decode). For each level of concurrent streams, the same load (each client reads `--rounds`
answers one after another) goes direct, then through the router; the report gives what the
router adds to the time to the first event and to the gaps between events (p50/p99), events
per second, streams completed and lost, and the CPU the ingress and router replicas spent per
1000 events. `--ingress-replicas` and `--router-replicas` set the deployments' sizes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import orjson

from bench import streamgen
from bench.local_ray import demo_upstream, local_router, replica_cpu_s

MODEL = "bench/stream"
RESULTS = Path(__file__).with_name("stream.json")


def _config(upstream: str, router_replicas: int) -> dict:
    provider = {"id": "paced", "api_host": upstream, "api_type": "openai", "input_size": 8192}
    return {
        "stream_models": {MODEL: {"providers": [provider]}},
        "active_models": {"stream_models": [MODEL]},
        "routing": {"stream_models": {"num_replicas": router_replicas}},
    }


def _level(router: str, upstream: str, body: dict, streams: int, rounds: int) -> dict:
    direct = streamgen.measure(f"{upstream}/v1/chat/completions", body, streams, rounds)
    before = replica_cpu_s()
    routed = streamgen.measure(f"{router}/v1/chat/completions", body, streams, rounds)
    after = replica_cpu_s()
    per_k = 1000 / max(1, routed["events"])
    return {
        "direct": direct,
        "router": routed,
        "added_ttft_p50_ms": round(routed["ttft_p50_ms"] - direct["ttft_p50_ms"], 3),
        "added_ttft_p99_ms": round(routed["ttft_p99_ms"] - direct["ttft_p99_ms"], 3),
        "added_itl_p50_ms": round(routed["itl_p50_ms"] - direct["itl_p50_ms"], 3),
        "added_itl_p99_ms": round(routed["itl_p99_ms"] - direct["itl_p99_ms"], 3),
        "cpu_ms_per_1k_events": {
            kind: round((after[kind] - before.get(kind, 0.0)) * 1000 * per_k, 2)
            for kind in ("ingress", "router")
            if kind in after
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="50,200,500", help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=200, help="events per answer")
    parser.add_argument("--pace-ms", type=float, default=25.0, help="between events")
    parser.add_argument("--rounds", type=int, default=2, help="answers per client")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--router-replicas", type=int, default=1)
    args = parser.parse_args(argv)

    # Long enough that every event carries a piece of the answer.
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream " * args.tokens}],
        "stream": True,
    }
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count()},
        "tokens": args.tokens,
        "pace_ms": args.pace_ms,
        "rounds": args.rounds,
        "ingress_replicas": args.ingress_replicas,
        "router_replicas": args.router_replicas,
        "levels": {},
    }
    paced = ("--chunks", str(args.tokens), "--chunk-delay", str(args.pace_ms / 1000))
    with demo_upstream(*paced) as upstream, local_router("bench-stream") as lr:
        config = _config(upstream, args.router_replicas)
        lr.deploy(config, "bench-stream", ingress_replicas=args.ingress_replicas)
        streamgen.measure(f"{lr.url}/v1/chat/completions", body, 8, 1)  # warm both paths
        for level in (int(n) for n in args.levels.split(",")):
            result = _level(lr.url, upstream, body, level, args.rounds)
            report["levels"][str(level)] = result  # type: ignore[index]
            print(level, orjson.dumps(result).decode(), flush=True)
        RESULTS.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
