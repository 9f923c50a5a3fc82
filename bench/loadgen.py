"""Closed-loop HTTP load: C clients for D seconds; prints one JSON line of figures. With several
`--url`s, client i sends to the i-th modulo their number (a direct call to a pool of upstreams).
With `--rate R`, the clients together send at most R requests a second (each paced to R / C).

Run as its own process so its CPU is not shared with the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import aiohttp
import orjson


def percentile(values: list[float], q: float) -> float:
    """In milliseconds, rounded."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0, 3)


def run_generator(module: str, urls: str | list[str], body: dict, args: list[str]) -> dict:
    """`python -m <module>` (this load generator or bench.streamgen) in a process of its own, off
    this one's CPU; its last line's figures."""
    command = [sys.executable, "-m", module, "--body", orjson.dumps(body).decode()]
    for url in [urls] if isinstance(urls, str) else urls:
        command += ["--url", url]
    out = subprocess.run([*command, *args], check=True, capture_output=True, text=True)
    return orjson.loads(out.stdout.strip().splitlines()[-1])


async def run(
    urls: list[str],
    body: bytes,
    concurrency: int,
    duration: float,
    warmup: float,
    extra_headers: dict[str, str],
    rate: float | None = None,
) -> dict:
    latencies: list[float] = []
    ttfb: list[float] = []
    events = errors = 0
    stream = b'"stream":true' in body
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + duration

        async def client(url: str) -> None:
            nonlocal events, errors
            headers = {"content-type": "application/json", **extra_headers}
            gap = concurrency / rate if rate else 0.0
            due = time.perf_counter()
            while (t0 := time.perf_counter()) < end:
                if gap:
                    due += gap
                    if due > t0:
                        await asyncio.sleep(due - t0)
                        t0 = time.perf_counter()
                first = None
                n = 0
                async with session.post(url, data=body, headers=headers) as resp:
                    async for chunk in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                        n += chunk.count(b"data: ")
                    ok = resp.status == 200
                t1 = time.perf_counter()
                if t0 < measure_from:
                    continue
                if not ok:
                    errors += 1
                    continue
                latencies.append(t1 - t0)
                if stream and first is not None:
                    ttfb.append(first - t0)
                    events += n

        await asyncio.gather(*(client(urls[i % len(urls)]) for i in range(concurrency)))
    out = {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / duration, 1),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
    }
    if stream:
        out["ttfb_p50_ms"] = percentile(ttfb, 0.50)
        out["ttfb_p99_ms"] = percentile(ttfb, 0.99)
        out["events_per_s"] = round(events / duration, 1)
    return out


def measure(
    urls: str | list[str],
    body: dict,
    concurrency: int,
    duration: float,
    headers: dict[str, str] | None = None,
    warmup: float = 1.5,
    rate: float | None = None,
) -> dict:
    """The load's figures (`warmup` seconds of it not counted)."""
    args = ["--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup)]
    if rate:
        args += ["--rate", str(rate)]
    for name, value in (headers or {}).items():
        args += ["--header", f"{name}: {value}"]
    return run_generator("bench.loadgen", urls, body, args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url", action="append", required=True, help="repeat to spread the clients over several"
    )
    parser.add_argument("--body", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--header", action="append", default=[], help="name: value")
    parser.add_argument("--rate", type=float, default=None, help="requests/s in all (open loop)")
    a = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in a.header)
    result = asyncio.run(
        run(a.url, a.body.encode(), a.concurrency, a.duration, a.warmup, headers, a.rate)
    )
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
