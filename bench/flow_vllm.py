"""Flow control in front of one real vLLM server (CPU build, the tiny model of `make e2e`): a
batch key keeps the server saturated (`--batch` streams at once, long answers), an interactive
key asks one short streamed question at a time; the interactive key's time to the first token
(p50, p99) and the batch's answers per second, with flow control (the provider's
`max_concurrency`, `queue_timeout_s`, the interactive key at a higher priority) and without, in
alternating phases. Prints each phase and writes bench/flow.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import aiohttp
import orjson

from bench.local_ray import free_port, local_router
from tests.e2e.harness import install, make_model
from tests.e2e.vllm_server import SERVED_MODEL, VllmServer, stop_leftovers

RESULTS = Path(__file__).with_name("flow.json")
ADMIN_TOKEN = "bench-flow-admin-token-9d4c2b7e1a"
MODEL = "bench/tiny"


def _config(server: VllmServer, flow: bool, slots: int) -> dict:
    vllm = {
        "id": server.name,
        "api_host": server.url,
        "api_type": "vllm",
        "model_path": SERVED_MODEL,
        "input_size": 256,
        **({"max_concurrency": slots} if flow else {}),
    }
    routing = {"queue_timeout_s": 300} if flow else {}
    return {
        "vllm_models": {MODEL: {"providers": [vllm]}},
        "active_models": {"vllm_models": [MODEL]},
        "routing": {"vllm_models": routing},
        "auth": {"require_keys": True},
    }


async def _key(http: aiohttp.ClientSession, url: str, name: str, priority: int) -> dict:
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    body = {"name": f"{name}-{time.monotonic_ns()}", "priority": priority}
    async with http.post(f"{url}/api/v1/keys", json=body, headers=admin) as resp:
        return {"authorization": f"Bearer {(await resp.json())['key']}"}


async def _stream(http: aiohttp.ClientSession, url: str, key: dict, tokens: int) -> float:
    """One streamed question; seconds to its first content token."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": tokens,
        "stream": True,
    }
    started = time.perf_counter()
    first = 0.0
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=key) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not first and line.startswith(b"data: {") and b'"content":"' in line:
                first = time.perf_counter() - started
    return first


async def _phase(url: str, args: argparse.Namespace) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        batch = await _key(http, url, "batch", 0)
        person = await _key(http, url, "person", 10)
        stop = asyncio.Event()
        done = 0

        async def loop() -> None:
            nonlocal done
            while not stop.is_set():
                await _stream(http, url, batch, args.batch_tokens)
                done += 1

        loops = [asyncio.ensure_future(loop()) for _ in range(args.batch)]
        await asyncio.sleep(args.settle_s)
        t0, before = time.perf_counter(), done
        ttft = [await _stream(http, url, person, 8) for _ in range(args.questions)]
        batch_rps = (done - before) / (time.perf_counter() - t0)
        stop.set()
        await asyncio.gather(*loops)
    ttft.sort()
    return {
        "interactive_ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "interactive_ttft_p99_ms": round(ttft[int(0.99 * (len(ttft) - 1))] * 1000, 1),
        "batch_answers_per_s": round(batch_rps, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="batch streams at once")
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4, help="max_concurrency with flow control")
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    for step in (install, make_model):
        if (problem := step()) is not None:
            print(f"bench.flow_vllm: vLLM is not available here: {problem}")
            return 1
    os.environ["LLM_ROUTER_ADMIN_TOKEN"] = ADMIN_TOKEN  # before Ray starts
    stop_leftovers()
    server = VllmServer("vllm-flow", free_port(), "nobind")
    report: dict[str, object] = {"workload": vars(args), "phases": []}
    try:
        server.start()
        server.wait_ready()
        with local_router("bench-flow") as lr:
            for round_ in range(args.rounds):
                for flow in (False, True) if round_ % 2 == 0 else (True, False):
                    lr.deploy(_config(server, flow, args.slots), "bench-flow")
                    row = {"flow_control": flow, **asyncio.run(_phase(lr.url, args))}
                    report["phases"].append(row)  # type: ignore[union-attr]
                    print(orjson.dumps(row).decode(), flush=True)
        RESULTS.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
