"""`make chaos`: a scale-down and a redeploy under load cut no request (replicas drain first)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from serve_app.demo.upstream import Knobs
from tests.conftest import deploy, provider, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.chaos]


def _config(url: str, replicas: int) -> dict:
    return {
        "drain_models": {"m/drain": {"providers": [provider("dr", url)]}},
        "active_models": {"drain_models": ["m/drain"]},
        "routing": {"drain_models": {"num_replicas": replicas, "drain_timeout_s": 30}},
    }


async def test_scale_down_and_redeploy_cut_no_request(serve_url: str, upstream_factory) -> None:
    up = upstream_factory("drain")
    up.knobs = Knobs(chunks=30, chunk_delay_s=0.1)  # each stream lasts about 3 s
    deploy(serve_url, _config(up.url, 2))
    chat = {"model": "m/drain", "messages": [{"role": "user", "content": "x" * 60}]}
    stop = asyncio.Event()
    outcomes: list[str] = []

    async def stream(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            body = {**chat, "stream": True}
            try:
                async with http.post(f"{serve_url}/v1/chat/completions", json=body) as resp:
                    text = await resp.text()
                    ok = resp.status == 200 and text.endswith("data: [DONE]\n\n")
                    ok = ok and "error" not in text
                    outcomes.append("ok" if ok else f"stream {resp.status} {text[-200:]}")
            except aiohttp.ClientError as exc:
                outcomes.append(f"stream {type(exc).__name__}")

    async def unary(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with http.post(f"{serve_url}/v1/chat/completions", json=chat) as resp:
                    raw = await resp.read()
                    try:
                        ok = resp.status == 200 and orjson.loads(raw)["choices"][0]["message"]
                    except orjson.JSONDecodeError:
                        ok = False
                    outcomes.append("ok" if ok else f"unary {resp.status} {raw[:200]!r}")
            except aiohttp.ClientError as exc:
                outcomes.append(f"unary {type(exc).__name__}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        load = [asyncio.ensure_future(stream(http)) for _ in range(8)]
        load += [asyncio.ensure_future(unary(http)) for _ in range(4)]
        # The replicas go while streams are mid-flight: every stream worker has one under way.
        await asyncio.to_thread(
            wait_for,
            lambda: sum(1 for r in up.requests if r.body.get("stream")) >= 8,
            30,
            "streams under way",
        )
        await asyncio.to_thread(deploy, serve_url, _config(up.url, 1))  # scale down
        await asyncio.to_thread(deploy, serve_url, _config(up.url, 1), 32 * 1024)  # redeploy
        stop.set()
        await asyncio.gather(*load)

    failures = [o for o in outcomes if o != "ok"]
    assert len(outcomes) > 50 and failures == []
