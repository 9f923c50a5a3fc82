"""Closed-loop HTTP load: C clients for D seconds; prints one JSON line of figures.

Run as its own process so its CPU is not shared with the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


async def run(
    url: str,
    body: bytes,
    concurrency: int,
    duration: float,
    warmup: float,
    extra_headers: dict[str, str],
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

        async def client() -> None:
            nonlocal events, errors
            headers = {"content-type": "application/json", **extra_headers}
            while (t0 := time.perf_counter()) < end:
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

        await asyncio.gather(*(client() for _ in range(concurrency)))
    out = {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / duration, 1),
        "p50_ms": round(_pct(latencies, 0.50), 3),
        "p99_ms": round(_pct(latencies, 0.99), 3),
    }
    if stream:
        out["ttfb_p50_ms"] = round(_pct(ttfb, 0.50), 3)
        out["ttfb_p99_ms"] = round(_pct(ttfb, 0.99), 3)
        out["events_per_s"] = round(events / duration, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--header", action="append", default=[], help="name: value")
    a = parser.parse_args()
    headers = dict(h.split(": ", 1) for h in a.header)
    result = asyncio.run(run(a.url, a.body.encode(), a.concurrency, a.duration, a.warmup, headers))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
