"""Paced streams: N clients each read `rounds` streamed answers one after another; prints one
JSON line: time to the first event and the gaps between events (p50/p99), events per second,
streams completed and lost (not 200, or no `[DONE]`).

Run as its own process so its CPU is not shared with the server under test. An event is one
SSE `data:` line; events that arrive in one read count the read's gap once (the others 0), as a
client sees them. With several `--url`s, client i reads from the i-th modulo their number.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson

from bench.loadgen import percentile, run_generator


async def run(urls: list[str], body: bytes, streams: int, rounds: int) -> dict:
    ttft: list[float] = []
    gaps: list[float] = []
    events = completed = lost = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()

        async def one(url: str) -> None:
            nonlocal events, completed, lost
            t0 = time.perf_counter()
            last = None
            tail = b""
            try:
                async with session.post(
                    url, data=body, headers={"content-type": "application/json"}
                ) as resp:
                    async for chunk in resp.content.iter_any():
                        now = time.perf_counter()
                        n = chunk.count(b"data: ")
                        if n:
                            if last is None:
                                ttft.append(now - t0)
                            else:
                                gaps.append(now - last)
                            gaps.extend([0.0] * (n - 1))
                            events += n
                            last = now
                        tail = (tail + chunk)[-32:]
                    ok = resp.status == 200 and tail.rstrip().endswith(b"data: [DONE]")
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                completed += 1
            else:
                lost += 1

        async def client(url: str) -> None:
            for _ in range(rounds):
                await one(url)

        await asyncio.gather(*(client(urls[i % len(urls)]) for i in range(streams)))
        elapsed = time.perf_counter() - started
    return {
        "streams": streams * rounds,
        "completed": completed,
        "lost": lost,
        "events": events,
        "events_per_s": round(events / elapsed, 1),
        "seconds": round(elapsed, 2),
        "ttft_p50_ms": percentile(ttft, 0.50),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "itl_p50_ms": percentile(gaps, 0.50),
        "itl_p99_ms": percentile(gaps, 0.99),
    }


def measure(urls: str | list[str], body: dict, streams: int, rounds: int) -> dict:
    """The streams' figures."""
    return run_generator(
        "bench.streamgen", urls, body, ["--streams", str(streams), "--rounds", str(rounds)]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url", action="append", required=True, help="repeat to spread the clients over several"
    )
    parser.add_argument("--body", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    a = parser.parse_args()
    print(orjson.dumps(asyncio.run(run(a.url, a.body.encode(), a.streams, a.rounds))).decode())


if __name__ == "__main__":
    main()
