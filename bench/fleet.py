"""`make bench-fleet`: routers in front of a simulated GPU fleet; writes bench/fleet.json and
charts into docs/.

The fleet: `--servers` simulated vLLM servers (serve_app/demo/vllm_sim, the H100 / Llama-3.1-8B
profile) in one process, their clock faster (or slower) than the wall's by a time scale chosen
per phase so each phase sends about `--wall-rate` requests per wall second. Before each phase
the fleet starts afresh (empty caches, a new clock), so no phase finds another's prompts.

Routers, one at a time: serve-router under each strategy (a model name of its own per phase, so
no phase inherits another's affinity state), `weighted_random` with equal weights as the random
baseline, and vLLM's Rust router (`vllm-router`, .venv-peers/vllm-router as for
`make bench-peers`; restarted per phase) under each policy, `kv_aware` fed by the servers' KV
events.

Workloads (unary chat requests, the prompt as chat text that the servers render with the e2e
tiny model's chat template and tokenize with its tokenizer, `--tokenizer simple` for the
simulator's own; the text made of words that are one token each, bench/fleet_text.py;
`x-session-id` names the conversation):
- `mooncake-<r>x`: the first `--trace-requests` of Mooncake's conversation trace
  (bench/traces/), at r times its rate; each 512-token block's text is made from its hash id,
  so equal ids are equal prefixes; outputs of the trace's `output_length`; the conversation is
  the first two block ids.
- `agents`: sessions of an agent (a shared tool prompt, then turns that each add a tool result
  and the model's answer to the history), started at random, each turn after the last answer;
  as many sessions as `--phase-s` wall seconds at `--wall-rate` hold.
- `zipf-<rate>`: a chat over many documents, picked Zipf-skewed, with a new question each, at
  Poisson rates stepping past the fleet's knee.

Per phase: TTFT p50/p90/p99, ITL p99 and end-to-end p99 on the simulated clock as the servers
measured them (arrival at the server to the token), input tokens per simulated second, the
prefix-cache hit rate from the servers' counters, requests per server (max/mean), the router's
CPU seconds per 1000 requests, the step loop's lag and the requests' intake (receipt to the
engine: rendering and tokenizing, whose wall time the sped-up clock multiplies): a phase whose
lag p99 passes `--max-lag-s` or whose intake p99 passes `--max-intake-s` (simulated) is marked
`valid: false` and its figures are not to be reported. The Mooncake phases' clock runs at most
`--max-time-scale` times the wall's, so a ~20 ms tokenization stays a small intake.
Before the routers, the tokenizer's cost per Mooncake request, then `--probe` fleet sizes take
the 4x Mooncake load per 16 servers straight from the client (no router), up to the first that
falls behind: the largest that keeps its clock is the host's limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil

from bench.fleet_charts import draw
from bench.fleet_text import Texts
from bench.local_ray import LocalRouter, local_router, wait_http
from bench.peers import (
    Router,
    cpu_used_s,
    install_peer,
    peer_version,
    started,
    tree_cpu_s,
    vllm_router_command,
)
from serve_app.demo.vllm_sim.profiles import H100_LLAMA_8B
from serve_app.routing.kv.tokens import load as load_tokenizer
from tests.e2e.tiny_model import write_tokenizer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("fleet.json")
TRACE = Path(__file__).with_name("traces") / "mooncake_conversation_trace.jsonl"
DOCS = ROOT / "docs"
SERVED = "sim-llama"
STRATEGIES = "round_robin,least_loaded,prefix_affinity,session_affinity,kv_aware,random"
PEER_POLICIES = "round_robin,cache_aware,consistent_hash,kv_aware"
# The e2e tiny model's tokenizer and chat template, made by tests/e2e/tiny_model.py when missing.
TOKENIZER = ROOT / ".e2e" / "tokenizer"
_COUNTER = re.compile(r"^(vllm:prefix_cache_(?:hits|queries)_total)\{[^}]*\} (\S+)$", re.M)


@dataclass
class Call:
    """One request of a workload, at `at` simulated seconds from the phase's start."""

    at: float
    messages: list[dict[str, str]]
    max_tokens: int
    session: str


# A workload: sends its calls through `send` (which answers the reply's text), on the clock.
Send = Callable[[Call], Awaitable[str | None]]


@dataclass
class Phase:
    name: str
    time_scale: float
    run: Callable[[Send, Callable[[float], Awaitable[None]]], Awaitable[None]]
    meta: dict[str, object] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)  # known beforehand (not the agents')


def _open_loop(calls: list[Call]) -> Callable[[Send, Callable], Awaitable[None]]:
    async def run(send: Send, until: Callable[[float], Awaitable[None]]) -> None:
        async def one(call: Call) -> None:
            await until(call.at)
            await send(call)

        await asyncio.gather(*(one(c) for c in calls))

    return run


def _trace(requests: int) -> list[dict]:
    return [orjson.loads(line) for line in TRACE.read_bytes().splitlines()[:requests]]


def mooncake(texts: Texts, rate: float, requests: int, wall_rate: float, max_scale: float) -> Phase:
    rows = _trace(requests)
    calls = []
    for row in rows:
        ids = row["hash_ids"]
        prompt = texts.trace_prompt(ids, row["input_length"])
        calls.append(
            Call(
                at=row["timestamp"] / 1000 / rate,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max(1, row["output_length"]),
                session="-".join(map(str, ids[:2])),
            )
        )
    span = calls[-1].at
    # Sped up to about `wall_rate` requests a wall second, but no more than `max_scale`: each
    # wall millisecond of tokenizing is `scale` simulated ones of intake.
    scale = min(max_scale, max(1.0, span / (requests / wall_rate)))
    meta = {
        "trace_requests": requests,
        "rate_x": rate,
        "trace_span_s": round(span, 1),
        "reusable_share": _reusable(rows),
    }
    return Phase(f"mooncake-{rate:g}x", scale, _open_loop(calls), meta, calls)


def _reusable(rows: list[dict]) -> float:
    """The share of the window's 512-token blocks that lead with ids seen before: the hit rate
    of one unbounded cache, the ceiling for any routing."""
    seen: set[int] = set()
    reused = total = 0
    for row in rows:
        ids = row["hash_ids"]
        lead = next((i for i, b in enumerate(ids) if b not in seen), len(ids))
        reused += lead
        total += len(ids)
        seen.update(ids)
    return round(reused / total, 4)


def zipf(texts: Texts, rate: float, sim_s: float, wall_rate: float, seed: int = 11) -> Phase:
    """Poisson arrivals at `rate` per simulated second for `sim_s`, over 200 documents of
    4,000-16,000 tokens ranked Zipf(1.1), each call a new question (50-150 tokens) on one,
    answers of 100-300 tokens."""
    rng = random.Random(seed)
    docs = [texts.words(f"doc{d}", rng.randint(4000, 16_000)) for d in range(200)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(docs))]
    calls, at, i = [], rng.expovariate(rate), 0
    while at < sim_s:
        d = rng.choices(range(len(docs)), weights)[0]
        messages = [
            {"role": "system", "content": docs[d]},
            {"role": "user", "content": texts.words(f"question{i}", rng.randint(50, 150))},
        ]
        calls.append(Call(at, messages, rng.randint(100, 300), f"doc{d}"))
        at += rng.expovariate(rate)
        i += 1
    # The simulated clock runs at wall_rate / rate: below 1 (slower than the wall's) when the
    # fleet takes more than the host can send.
    meta = {"rate_per_s": rate, "sim_s": sim_s}
    return Phase(f"zipf-{rate:g}", wall_rate / rate, _open_loop(calls), meta, calls)


def agents(texts: Texts, phase_s: float, wall_rate: float, seed: int = 12) -> Phase:
    """Sessions of 6 turns: a 3,000-token tool prompt shared by all, each turn a tool result of
    200-600 tokens and an answer of 50-200, a think time of 2 s (mean, exponential) between."""
    rng = random.Random(seed)
    turns, think_s = 6, 2.0
    tools = texts.words("tools", 3000)
    sessions = max(1, int(wall_rate * phase_s / turns))
    scale = 4.0
    starts = sorted(rng.uniform(0, phase_s * scale * 0.4) for _ in range(sessions))
    plans = [
        [
            (rng.randint(200, 600), rng.randint(50, 200), rng.expovariate(1 / think_s))
            for _ in range(turns)
        ]
        for _ in range(sessions)
    ]

    async def run(send: Send, until: Callable[[float], Awaitable[None]]) -> None:
        async def session(s: int) -> None:
            await until(starts[s])
            history = [{"role": "system", "content": tools}]
            for t, (result, answer, think) in enumerate(plans[s]):
                history.append({"role": "user", "content": texts.words(f"s{s}t{t}", result)})
                reply = await send(Call(0.0, list(history), answer, f"agent{s}"))
                if reply is None:
                    return
                history.append({"role": "assistant", "content": reply})
                await asyncio.sleep(think / scale)

        await asyncio.gather(*(session(s) for s in range(sessions)))

    meta = {"sessions": sessions, "turns": turns, "tool_prompt_tokens": 3000}
    return Phase("agents", scale, run, meta)


def tokenizer_cost(folder: Path | None, texts: Texts, requests: int) -> dict[str, object]:
    """What each server spends rendering and tokenizing one Mooncake request (the window's
    first `requests`), here in this process: the simulator's share of a request's CPU that the
    tokenizer takes (vllm-router's `kv_aware` asks for it once more, through `/render`, which
    the server's cache of recent prompts answers)."""
    tokenizer = load_tokenizer(folder)
    prompts = [texts.trace_prompt(r["hash_ids"], r["input_length"]) for r in _trace(requests)]
    began = time.perf_counter()
    tokens = sum(len(tokenizer.chat_prompt([{"role": "user", "content": p}])) for p in prompts)
    spent = time.perf_counter() - began
    return {
        "tokenizer": "simple" if folder is None else str(folder),
        "ms_per_request": round(spent / len(prompts) * 1000, 2),
        "tokens_per_request": round(tokens / len(prompts)),
    }


def phases(args: argparse.Namespace, texts: Texts) -> list[Phase]:
    out = [
        mooncake(texts, r, args.trace_requests, args.wall_rate, args.max_time_scale)
        for r in (1.0, 2.0, 4.0)
    ]
    out.append(agents(texts, args.phase_s, args.wall_rate))
    rates = [float(r) for r in args.zipf_rates.split(",")]
    out += [zipf(texts, r, args.zipf_sim_s, args.wall_rate) for r in rates]
    wanted = set(args.workloads.split(",")) if args.workloads else None
    return [p for p in out if wanted is None or p.name.split("-")[0] in wanted]


# -- the fleet


def free_ports(n: int) -> int:
    """The first of `n` consecutive free loopback ports."""
    for base in range(20_000, 60_000, 97):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


@dataclass
class SimFleet:
    urls: list[str]
    process: subprocess.Popen[bytes]
    # Per server: the KV events' PUB and replay endpoints (none unless asked for).
    kv_events: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def fleet(servers: int, tokenizer: Path | None, kv_events: bool = False) -> Iterator[SimFleet]:
    """`servers` simulated servers in one process on loopback, tokenizing with the folder's
    tokenizer (None: the simple one), serving `/render`, publishing KV events if asked."""
    base = free_ports(3 * servers if kv_events else servers)
    command = [
        sys.executable,
        *["-m", "serve_app.demo.vllm_sim", "--servers", str(servers), "--port", str(base)],
        *["--served-model-name", SERVED, "--enable-prompt-tokens-details"],
        "--enable-scale-out",  # /render: kv_aware's, and prime()'s
        *(["--tokenizer", str(tokenizer)] if tokenizer is not None else []),
    ]
    endpoints: list[tuple[str, str]] = []
    if kv_events:
        # `*` as vLLM takes it (bind), which the simulator narrows to its own 127.0.0.1.
        pub, replay = base + servers, base + 2 * servers
        # Topic "" (vLLM's default): vllm-router 0.1.17 subscribes its static sources to "" and
        # drops every frame of another topic unseen (it has no topic flag).
        config = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": ""}
        config |= {"endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{replay}"}
        command += ["--kv-events-config", orjson.dumps(config).decode()]
        at = "tcp://127.0.0.1"
        endpoints = [(f"{at}:{pub + i}", f"{at}:{replay + i}") for i in range(servers)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    urls = [f"http://127.0.0.1:{base + i}" for i in range(servers)]
    try:
        for url in urls:
            wait_http(f"{url}/v1/models", 30, process)
        yield SimFleet(urls, process, endpoints)
    finally:
        process.terminate()
        process.wait(10)


def kv_aware_args(sim: SimFleet) -> list[str]:
    """vllm-router's static KV event sources for `kv_aware`: each server's PUB and replay
    endpoints, the model they serve and their block size."""
    out = ["--kv-event-model", SERVED, "--kv-event-block-size", str(H100_LLAMA_8B.block_size)]
    for url, (pub, replay) in zip(sim.urls, sim.kv_events, strict=True):
        out += ["--kv-event-source", f"{url}={pub}", "--kv-event-replay-source", f"{url}={replay}"]
    return out


def _cpu_s(process: subprocess.Popen[bytes]) -> float:
    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


def _ray_cpu_s(sim: subprocess.Popen[bytes]) -> dict[tuple[int, float], float]:
    """CPU seconds so far of this process's descendants but the simulator: the local Ray that
    serve-router runs on (its proxy, replicas and actors, and Ray's own processes)."""
    out: dict[tuple[int, float], float] = {}
    for member in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if member.pid != sim.pid:
                times = member.cpu_times()
                out[(member.pid, member.create_time())] = times.user + times.system
    return out


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


async def run_phase(
    phase: Phase,
    target: str,
    model: str,
    urls: list[str],
    sim: subprocess.Popen[bytes],
) -> dict:
    """`target`: where to send (a router's URL; "" spreads over the servers at random)."""
    timeout = aiohttp.ClientTimeout(total=900)
    connector = aiohttp.TCPConnector(limit=0)
    failed: list[str] = []
    rng = random.Random(5)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        async with http.post(f"{urls[0]}/sim/reset", json={"time_scale": phase.time_scale}) as r:
            assert r.status == 200, await r.text()
        began = time.monotonic()
        sim_cpu = _cpu_s(sim)

        async def until(at: float) -> None:
            await asyncio.sleep(max(0.0, began + at / phase.time_scale - time.monotonic()))

        async def send(call: Call) -> str | None:
            body = {
                "model": model,
                "messages": call.messages,
                "max_tokens": call.max_tokens,
                "temperature": 0,
            }
            url = target or rng.choice(urls)
            try:
                async with http.post(
                    f"{url}/v1/chat/completions", json=body, headers={"x-session-id": call.session}
                ) as resp:
                    if resp.status != 200:
                        failed.append(f"{resp.status} {(await resp.read())[:200]!r}")
                        return None
                    answer = orjson.loads(await resp.read())
            except aiohttp.ClientError as exc:
                failed.append(repr(exc))
                return None
            return answer["choices"][0]["message"]["content"]

        await phase.run(send, until)
        wall = time.monotonic() - began
        sim_cpu = _cpu_s(sim) - sim_cpu
        stats, counters = (
            [],
            {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0},
        )
        for url in urls:
            async with http.get(f"{url}/sim/stats", params={"reset": "1"}) as r:
                stats.append(orjson.loads(await r.read()))
            async with http.get(f"{url}/metrics") as r:
                for name, value in _COUNTER.findall(await r.text()):
                    counters[name] += float(value)
    records = [rec for s in stats for rec in s["requests"]]
    per_server = [len(s["requests"]) for s in stats]
    lag = stats[0]["lag_s"]
    sim_span = stats[0]["now"]
    queries = counters["vllm:prefix_cache_queries_total"]
    return {
        "requests": len(records),
        "failed": len(failed),
        "failures": failed[:5],
        "ttft_p50_ms": _ms(_quantile([r["ttft"] for r in records], 0.5)),
        "ttft_p90_ms": _ms(_quantile([r["ttft"] for r in records], 0.9)),
        "ttft_p99_ms": _ms(_quantile([r["ttft"] for r in records], 0.99)),
        "itl_p99_ms": _ms(_quantile([g for r in records for g in r["itl"]], 0.99)),
        "e2e_p99_ms": _ms(_quantile([r["e2e"] for r in records], 0.99)),
        "input_tokens_per_s": round(sum(r["prompt_tokens"] for r in records) / sim_span),
        "hit_rate": round(counters["vllm:prefix_cache_hits_total"] / queries, 4)
        if queries
        else None,
        "preemptions": sum(r["preemptions"] for r in records),
        "per_server_max_over_mean": round(max(per_server) / statistics.mean(per_server), 2)
        if records
        else None,
        "per_server": per_server,
        "time_scale": round(phase.time_scale, 3),
        "sim_s": round(sim_span, 1),
        "wall_s": round(wall, 1),
        "simulator_cpu_s": round(sim_cpu, 1),
        "lag_p99_ms": _ms(lag["p99"]),
        "lag_max_ms": _ms(lag["max"]),
        "intake_p50_ms": _ms(_quantile([r["intake"] for r in records], 0.5)),
        "intake_p99_ms": _ms(_quantile([r["intake"] for r in records], 0.99)),
    }


async def prime(url: str, all_phases: list[Phase], parallel: int = 4) -> float:
    """Each distinct prompt of the phases rendered once by the fleet (`/render`, nothing run),
    so the simulator's tokenizer has its pieces cached before any router: every router's phase
    then meets the same intake, not the first one alone the tokenizing. Its wall seconds."""
    began = time.monotonic()
    distinct = {orjson.dumps(c.messages): c.messages for p in all_phases for c in p.calls}
    todo = iter(distinct.values())
    async with aiohttp.ClientSession() as http:

        async def worker() -> None:
            for messages in todo:
                body = {"model": SERVED, "messages": messages}
                async with http.post(f"{url}/v1/chat/completions/render", json=body) as r:
                    assert r.status == 200, await r.text()

        await asyncio.gather(*(worker() for _ in range(parallel)))
    return round(time.monotonic() - began, 1)


async def warm_up(url: str, model: str, requests: int = 64, timeout_s: float = 60.0) -> None:
    """Short requests through a freshly started router, 8 at a time, not measured (the first
    ones after a deploy meet replicas still starting, some still on the previous config: a
    404 for the new model is asked again until `timeout_s`). Its own model name where the
    router keeps state per model; the fleet is reset before each phase."""
    body = {"model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2}
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            headers = {"x-session-id": f"warm-up-{i}"}
            while True:
                async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    if r.status == 200:
                        return
                    text = await r.text()
                assert r.status == 404 and time.monotonic() < deadline, text
                await asyncio.sleep(0.1)

        for start in range(0, requests, 8):
            await asyncio.gather(*(one(i) for i in range(start, start + 8)))


def _mark(result: dict, args: argparse.Namespace) -> dict:
    """Valid: nothing failed, the step loop kept its clock and requests reached the engines
    about when they were sent (the intake p99 within `--max-intake-s`)."""
    kept_clock = result["lag_p99_ms"] <= args.max_lag_s * 1000
    on_time = (result["intake_p99_ms"] or 0.0) <= args.max_intake_s * 1000
    result["valid"] = kept_clock and on_time and not result["failed"]
    return result


# -- the routers


def _serve_config(sim: SimFleet, models: list[str], strategy: str, tokenizer: Path | None) -> dict:
    """kv_aware's models name the servers' KV events (as the servers were given them: `*`, so
    the router connects) and the tokenizer folder the servers use."""
    kv = strategy == "kv_aware"

    def providers(model: str) -> list[dict]:
        out = []
        for i, url in enumerate(sim.urls):
            p = {
                "id": f"{model}-sim-{i}",
                "api_host": url,
                "api_type": "vllm",
                "model_path": SERVED,
                # The router estimates tokens from characters; the benchmark's one-token words
                # are longer than English tokens, so the profile's 131,072 would turn some away.
                "input_size": 262_144,
            }
            if kv:
                p["kv_events"] = {"endpoint": sim.kv_events[i][0].replace("127.0.0.1", "*")}
            out.append(p)
        return out

    def model(name: str) -> dict:
        extra = {"tokenizer": str(tokenizer)} if kv and tokenizer is not None else {}
        return {"providers": providers(name), **extra}

    return {
        "vllm_models": {m: model(m) for m in models},
        "active_models": {"vllm_models": models},
        "routing": {
            "vllm_models": {
                "strategy": strategy,
                "health_check_interval_s": 1.0,
                "request_timeout_s": 900,
            }
        },
    }


def _print(label: str, result: dict) -> None:
    keys = ("ttft_p50_ms", "ttft_p99_ms", "hit_rate", "per_server_max_over_mean", "lag_p99_ms")
    shown = {k: result.get(k) for k in ("requests", "failed", *keys, "valid")}
    print(f"{label}: {orjson.dumps(shown).decode()}", flush=True)


def _serve_router_phases(
    report: dict,
    lr: LocalRouter,
    strategy: str,
    all_phases: list[Phase],
    sim: SimFleet,
    args: argparse.Namespace,
    tokenizer: Path | None,
) -> None:
    name = "weighted_random" if strategy == "random" else strategy
    models = [f"{p.name}-{strategy}" for p in all_phases]
    config = _serve_config(sim, [*models, f"warm-up-{strategy}"], name, tokenizer)
    lr.deploy(config, "bench-fleet")
    asyncio.run(warm_up(lr.url, f"warm-up-{strategy}"))
    for phase in all_phases:
        before = _ray_cpu_s(sim.process)
        model = f"{phase.name}-{strategy}"
        result = asyncio.run(run_phase(phase, lr.url, model, sim.urls, sim.process))
        used = cpu_used_s(before, _ray_cpu_s(sim.process))
        _record(report, phase, f"serve-router {strategy}", result, used, args)


def _vllm_router_phases(
    report: dict, policy: str, all_phases: list[Phase], sim: SimFleet, args: argparse.Namespace
) -> None:
    """Each phase on a freshly started vllm-router (nothing learnt in one phase is used in
    the next); `kv_aware` subscribed to the servers' KV events, no model hub."""
    label = f"vllm-router {policy}"
    extra = kv_aware_args(sim) if policy == "kv_aware" else []
    router = Router(label, vllm_router_command(policy, extra), env={"HF_HUB_OFFLINE": "1"})
    for phase in all_phases:
        with started(router, sim.urls) as running:
            asyncio.run(warm_up(running.url, SERVED))
            before = tree_cpu_s(running.process)
            result = asyncio.run(run_phase(phase, running.url, SERVED, sim.urls, sim.process))
            used = cpu_used_s(before, tree_cpu_s(running.process))
        _record(report, phase, label, result, used, args)


def _record(
    report: dict, phase: Phase, label: str, result: dict, cpu_s: float, args: argparse.Namespace
) -> None:
    result["router_cpu_s_per_1k"] = round(cpu_s / max(1, result["requests"]) * 1000, 2)
    report["workloads"].setdefault(phase.name, {"meta": phase.meta, "routers": {}})
    report["workloads"][phase.name]["routers"][label] = _mark(result, args)
    _print(f"{phase.name} {label}", result)


def table(report: dict) -> str:
    """The figures as a Markdown table (docs/performance.md), a row per workload and router."""
    head = (
        "| workload | router | TTFT p50 / p90 / p99 ms | ITL p99 ms | e2e p99 s | input tok/s "
        "| hit rate | max/mean per server | router CPU s/1k | lag / intake p99 ms |"
    )
    rows = [head, "|" + "---|" * 10]
    for name, workload in report["workloads"].items():
        for i, (router, r) in enumerate(workload["routers"].items()):
            ttft = " / ".join(f"{r[k]:,.0f}" for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"))
            lag = f"{r['lag_p99_ms']:,.0f} / {r.get('intake_p99_ms') or 0:,.0f}"
            lag += "" if r["valid"] else " (fell behind)"
            rows.append(
                f"| {name if i == 0 else ''} | {router} | {ttft} | {r['itl_p99_ms']:,.0f} "
                f"| {r['e2e_p99_ms'] / 1000:,.1f} | {r['input_tokens_per_s']:,} | {r['hit_rate']} "
                f"| {r['per_server_max_over_mean']} | {r['router_cpu_s_per_1k']} | {lag} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=16)
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--peers", default=PEER_POLICIES, help="vllm-router policies ('' none)")
    parser.add_argument("--workloads", default="", help="mooncake,agents,zipf (default: all)")
    parser.add_argument("--phase-s", type=float, default=8.0, help="wall seconds per phase")
    parser.add_argument("--wall-rate", type=float, default=30.0, help="requests per wall s")
    parser.add_argument("--trace-requests", type=int, default=200)
    parser.add_argument("--zipf-rates", default="16,32,64", help="requests per simulated s")
    parser.add_argument("--zipf-sim-s", type=float, default=5.0, help="simulated s per step")
    parser.add_argument(
        "--probe",
        default="16,32",
        help="fleet sizes to probe, up to the first that falls behind ('' none)",
    )
    parser.add_argument(
        "--tokenizer",
        default=str(TOKENIZER),
        help="a HF tokenizer folder (default: the e2e tiny model's, made if missing) or "
        "'simple' (the simulator's one token per word)",
    )
    parser.add_argument("--max-lag-s", type=float, default=0.1, help="simulated seconds")
    parser.add_argument(
        "--max-intake-s", type=float, default=0.2, help="simulated seconds (p99 per phase)"
    )
    parser.add_argument(
        "--max-time-scale", type=float, default=5.0, help="the Mooncake phases' clock at most"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--charts", default=str(DOCS), help="their folder ('' for none)")
    parser.add_argument("--table", action="store_true", help="print the table of --output")
    args = parser.parse_args(argv)
    if args.table:
        print(table(orjson.loads(args.output.read_bytes())))
        return 0
    began = time.monotonic()
    report: dict = {
        "machine": {"cpus": os.cpu_count()},
        "servers": args.servers,
        "profile": "h100-llama-3.1-8b",
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "charts", "table")},
        "probe": {},
        "workloads": {},
    }
    tokenizer = None if args.tokenizer == "simple" else Path(args.tokenizer)
    if tokenizer == TOKENIZER and not (TOKENIZER / "tokenizer.json").exists():
        write_tokenizer(TOKENIZER)
    texts = Texts.for_tokenizer(tokenizer)
    report["tokenizer"] = tokenizer_cost(tokenizer, texts, 60)
    print(f"bench-fleet: tokenizer {orjson.dumps(report['tokenizer']).decode()}", flush=True)
    all_phases = phases(args, texts)
    for n in [int(n) for n in args.probe.split(",") if n]:
        with fleet(n, tokenizer) as sim:
            # The 4x load per 16 servers, on the 4x phase's clock: n/16 times its wall rate.
            requests, scale = args.trace_requests, args.max_time_scale
            probe = mooncake(texts, 4.0 * n / 16, requests * n // 16, args.wall_rate, scale)
            probe.time_scale = mooncake(texts, 4.0, requests, args.wall_rate, scale).time_scale
            asyncio.run(prime(sim.urls[0], [probe]))
            result = asyncio.run(run_phase(probe, "", SERVED, sim.urls, sim.process))
        report["probe"][str(n)] = _mark(result, args)
        _print(f"probe {n} servers", result)
        if not result["valid"]:
            break  # a larger fleet on this host falls behind as well
    policies = [p for p in args.peers.split(",") if p]
    if policies and (problem := install_peer("vllm-router")) is not None:
        print(f"bench-fleet: vllm-router not installed: {problem}")
        policies = []
    report["vllm_router"] = peer_version("vllm-router") if policies else None
    strategies = [s for s in args.strategies.split(",") if s]
    kv_events = "kv_aware" in policies or "kv_aware" in strategies
    with fleet(args.servers, tokenizer, kv_events=kv_events) as sim:
        # The simulated GPUs' clock comes first: what starts from now on (Ray and the routers)
        # and the load generator in this process run 5 steps nicer, so CPU contention delays
        # arrivals rather than the steps.
        os.nice(5)
        report["primed_s"] = asyncio.run(prime(sim.urls[0], all_phases))
        print(f"bench-fleet: prompts tokenized beforehand in {report['primed_s']} s", flush=True)
        if strategies:
            with local_router("bench-fleet") as lr:
                for strategy in strategies:
                    _serve_router_phases(report, lr, strategy, all_phases, sim, args, tokenizer)
        for policy in policies:
            _vllm_router_phases(report, policy, all_phases, sim, args)
    kept_up = [int(n) for n, r in report["probe"].items() if r["valid"]]
    report["largest_fleet_kept_up"] = max(kept_up, default=None)
    report["wall_s"] = round(time.monotonic() - began)
    report["valid"] = all(
        r["valid"] for w in report["workloads"].values() for r in w["routers"].values()
    )
    args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if args.charts:
        draw(report, Path(args.charts))
    print(table(report))
    print(f"bench-fleet: {report['wall_s']} s, valid: {report['valid']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
