"""`make bench-affinity`: the routing strategies on three real vLLM servers (CPU build, prefix
caching on) with a multi-turn chat workload; writes bench/affinity.json.

Each phase deploys the router with one strategy and runs the same workload: conversations of
several turns, each turn re-sending the whole history (a shared system prompt first), a fixed
number of conversations in flight. Two workloads: `long_system` (the shared system prompt as
long as the context leaves room for, so every server soon caches it whatever the strategy) and
`short_system` (a one-line system prompt: the history is most of each prompt). The system
prompt carries the workload's and phase's names, so no phase finds another's prompts in the
servers' caches. Per phase: the servers' own prefix-cache hit rate
(`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, deltas), time to the first
streamed event p50/p99, requests per second, and requests per server (the servers' own
`vllm:request_success_total`).

With `--peers`, vLLM's Rust router (`vllm-router`, in .venv-peers/vllm-router as for
`make bench-peers`) runs the same workloads on the same servers with each named policy
(`cache_aware`, `consistent_hash`: the latter keys on the same `x-session-id` header that
session_affinity reads), one row per policy beside the strategies.

The servers publish their KV-cache events (to sockets on loopback) in every phase; kv_aware's
phase gives them and the model's tokenizer to the router.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from bench.local_ray import free_port, local_router
from bench.peers import Router, install_peer, started, vllm_router_command
from tests.e2e.harness import install, make_model
from tests.e2e.vllm_server import MODEL_DIR, SERVED_MODEL, VllmServer, stop_leftovers

RESULTS = Path(__file__).with_name("affinity.json")
STRATEGIES = "balanced,least_loaded,prefix_affinity,session_affinity,kv_aware"
PEER_POLICIES = "cache_aware,consistent_hash"
MAX_MODEL_LEN = 2048
# The tiny model with room for longer prompts: its weights do not depend on the positions
# (rotary embeddings); only the configured maximum changes.
LONG_MODEL = MODEL_DIR / "long"
# vLLM's CPU attention takes blocks in multiples of 32 tokens.
BLOCK_SIZE = 32
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK_SIZE)]
# Words of the shared system prompt (about 1.9 tokens each with the tiny model's tokenizer):
# long_system fills what 6 turns leave of the context.
WORKLOADS = {"long_system": 600, "short_system": 10}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "model",
    "router",
    "cache",
    "prefix",
    "server",
    "token",
]
_COUNTER = re.compile(
    r"^(vllm:prefix_cache_(?:hits|queries)_total|vllm:request_success_total)\{[^}]*\} (\S+)$", re.M
)


def _long_model() -> Path:
    if not (LONG_MODEL / "config.json").exists():
        shutil.copytree(MODEL_DIR / "base", LONG_MODEL, dirs_exist_ok=True)
        config = orjson.loads((LONG_MODEL / "config.json").read_bytes())
        config["max_position_embeddings"] = MAX_MODEL_LEN
        (LONG_MODEL / "config.json").write_bytes(orjson.dumps(config))
    return LONG_MODEL


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _kv_events() -> dict[str, str]:
    """A server's KV-event endpoints on loopback: the router binds the first (the server
    connects to it), the server the replay one."""
    return {
        "endpoint": f"tcp://127.0.0.1:{free_port()}",
        "replay_endpoint": f"tcp://127.0.0.1:{free_port()}",
    }


def _server(i: int, model: Path) -> tuple[VllmServer, dict[str, str]]:
    """A server publishing its KV events (every phase: kv_aware's reads them), and them."""
    events = _kv_events()
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "", **events}
    args = [*SERVER_ARGS, "--kv-events-config", orjson.dumps(config).decode()]
    return VllmServer(f"vllm-{i}", free_port(), "nobind", args, model), events


def _config(
    servers: list[tuple[VllmServer, dict[str, str]]], model: str, strategy: str, tokenizer: Path
) -> dict:
    """`model`: the phase's own name for the served model, so the broker's use counts (which
    `balanced` follows) start at zero in each phase. Only kv_aware's phase names the servers'
    events and the model's tokenizer (its picker replica binds the event endpoints)."""
    kv = strategy == "kv_aware"
    providers = [
        {
            "id": s.name,
            "api_host": s.url,
            "api_type": "vllm",
            "model_path": SERVED_MODEL,
            "input_size": MAX_MODEL_LEN,
            **({"kv_events": events} if kv else {}),
        }
        for s, events in servers
    ]
    tokens = {"tokenizer": str(tokenizer), "kv_block_size": BLOCK_SIZE} if kv else {}
    return {
        "vllm_models": {model: {"providers": providers, **tokens}},
        "active_models": {"vllm_models": [model]},
        "routing": {
            "vllm_models": {
                "strategy": strategy,
                "health_check_interval_s": 1.0,
                "request_timeout_s": 120,
            }
        },
    }


async def _counters(http: aiohttp.ClientSession, servers: list[VllmServer]) -> dict[str, dict]:
    out = {}
    for s in servers:
        async with http.get(f"{s.url}/metrics") as resp:
            page = await resp.text()
        counters: dict[str, float] = {}
        for name, value in _COUNTER.findall(page):  # summed over engines and finish reasons
            counters[name] = counters.get(name, 0.0) + float(value)
        out[s.name] = counters
    return out


async def _phase(
    router: str,
    servers: list[VllmServer],
    model: str,
    system_words: int,
    args: argparse.Namespace,
    label: str | None = None,
) -> dict:
    """`label` (default `model`) opens the system prompt: each phase's prompts are its own."""
    rng = random.Random(7)
    system = f"[{label or model}] You are a router benchmark. " + _text(rng, system_words)
    conversations: asyncio.Queue[int] = asyncio.Queue()
    for c in range(args.conversations):
        conversations.put_nowait(c)
    ttft: list[float] = []
    failed: list[str] = []

    async def conversation(http: aiohttp.ClientSession, c: int) -> None:
        history = [{"role": "system", "content": system}]
        for turn in range(args.turns):
            question = f"conversation {c} turn {turn}: " + _text(rng, args.turn_words)
            history.append({"role": "user", "content": question})
            body = {
                "model": model,
                "messages": history,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
            }
            started = time.perf_counter()
            first = None
            answer = []
            async with http.post(
                f"{router}/v1/chat/completions", json=body, headers={"x-session-id": f"c{c}"}
            ) as resp:
                if resp.status != 200:
                    failed.append(f"{resp.status} {(await resp.read())[:200]!r}")
                    return
                async for line in resp.content:
                    if first is None and line.startswith(b"data: "):
                        first = time.perf_counter() - started
                    if line.startswith(b"data: {"):
                        for choice in orjson.loads(line[6:]).get("choices", []):
                            answer.append(choice.get("delta", {}).get("content") or "")
            ttft.append(first or 0.0)
            history.append({"role": "assistant", "content": "".join(answer)})

    async def worker(http: aiohttp.ClientSession) -> None:
        while not conversations.empty():
            await conversation(http, conversations.get_nowait())

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        before = await _counters(http, servers)
        began = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - began
        after = await _counters(http, servers)

    def delta(counter: str) -> Counter[str]:
        return Counter({n: int(after[n][counter] - before[n][counter]) for n in after})

    hits = sum(delta("vllm:prefix_cache_hits_total").values())
    queries = sum(delta("vllm:prefix_cache_queries_total").values())
    served = delta("vllm:request_success_total")
    requests = sum(served.values())
    mean = requests / len(servers)
    ttft.sort()
    return {
        "hit_rate": round(hits / queries, 4) if queries else None,
        "prompt_tokens": int(queries),
        "cached_tokens": int(hits),
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1) if ttft else None,
        "ttft_p99_ms": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] * 1000, 1)
        if ttft
        else None,
        "requests_per_s": round(requests / elapsed, 2),
        "requests": requests,
        "failed": failed,
        "per_server": dict(sorted(served.items())),
        "max_over_mean_load": round(max(served.values()) / mean, 2) if served else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument(
        "--peers", default=PEER_POLICIES, help="vllm-router policies to run beside ('' for none)"
    )
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--workloads", default="long_system,short_system", help=", ".join(WORKLOADS)
    )
    parser.add_argument("--turn-words", type=int, default=40, help="each user turn")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    for step in (install, make_model):
        if (problem := step()) is not None:
            print(f"bench-affinity: vLLM is not available here: {problem}")
            return 1
    policies = [p for p in args.peers.split(",") if p]
    if policies and (problem := install_peer("vllm-router")) is not None:
        print(f"bench-affinity: vllm-router not installed: {problem}")
        return 1
    stop_leftovers()
    model = _long_model()
    made = [_server(i, model) for i in range(3)]
    servers = [s for s, _ in made]
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count()},
        "servers": len(servers),
        "server_args": SERVER_ARGS,
        "workload": {k: v for k, v in vars(args).items() if k not in ("strategies", "peers")},
        "system_words": WORKLOADS,
        "workloads": {},
    }
    try:
        for server in servers:  # one at a time: a starting engine stalls beside a busy one
            server.start()
            server.wait_ready()
        with local_router("bench-affinity") as lr:
            # Each server's first requests are slow (warm-up, not reported).
            lr.deploy(_config(made, "warm-up", "balanced", model), "bench-affinity")
            warm = {**vars(args), "conversations": args.concurrency, "turns": 2}
            asyncio.run(_phase(lr.url, servers, "warm-up", 10, argparse.Namespace(**warm)))
            for workload in args.workloads.split(","):
                phases: dict[str, dict] = {}
                report["workloads"][workload] = phases  # type: ignore[index]
                for strategy in args.strategies.split(","):
                    name = f"{workload}-{strategy}"
                    lr.deploy(_config(made, name, strategy, model), "bench-affinity")
                    phases[strategy] = asyncio.run(
                        _phase(lr.url, servers, name, WORKLOADS[workload], args)
                    )
                    print(name, orjson.dumps(phases[strategy]).decode(), flush=True)
                for policy in policies:
                    label = f"{workload}-vllm-router-{policy}"
                    peer = Router(label, vllm_router_command(policy))
                    with started(peer, [s.url for s in servers]) as running:
                        phases[f"vllm-router {policy}"] = asyncio.run(
                            _phase(
                                running.url, servers, SERVED_MODEL, WORKLOADS[workload], args, label
                            )
                        )
                    print(label, orjson.dumps(phases[f"vllm-router {policy}"]).decode(), flush=True)
        RESULTS.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
