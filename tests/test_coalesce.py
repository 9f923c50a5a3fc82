"""Coalescer: calls made together share one trip; results come back to the right caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serve_app.ingress.coalesce import Coalescer


class Senders:
    def __init__(self) -> None:
        self.one: list[str] = []
        self.many: list[list[str]] = []
        self.release: dict[str, asyncio.Event] = {}

    def gate(self, req: str) -> asyncio.Event:
        return self.release.setdefault(req, asyncio.Event())

    async def send_one(self, req: str) -> str:
        self.one.append(req)
        await self.gate(req).wait()
        return req.upper()

    async def send_many(self, reqs: list[str]) -> AsyncIterator[tuple[int, str]]:
        self.many.append(reqs)
        pending = {asyncio.ensure_future(self._wait(i, r)) for i, r in enumerate(reqs)}
        for done in asyncio.as_completed(pending):
            yield await done

    async def _wait(self, i: int, req: str) -> tuple[int, str]:
        await self.gate(req).wait()
        return i, req.upper()


async def test_a_lone_call_takes_the_plain_path() -> None:
    s = Senders()
    c = Coalescer(s.send_one, s.send_many)
    s.gate("a").set()
    assert await c.call("a") == "A"
    assert s.one == ["a"] and s.many == [] and c.batches == 0


async def test_calls_made_together_share_a_trip_and_finish_independently() -> None:
    s = Senders()
    c = Coalescer(s.send_one, s.send_many, busy_threshold=1, busy_window_s=0.0)
    tasks = [asyncio.ensure_future(c.call(x)) for x in ("a", "b", "c")]
    s.gate("c").set()
    assert await tasks[2] == "C"  # the last one finishes first, the others still wait
    assert not tasks[0].done() and not tasks[1].done()
    s.gate("a").set()
    s.gate("b").set()
    assert await asyncio.gather(*tasks) == ["A", "B", "C"]
    assert s.many == [["a", "b", "c"]] and s.one == [] and c.batches == 1


async def test_below_the_threshold_nothing_waits_for_company() -> None:
    s = Senders()
    c = Coalescer(s.send_one, s.send_many, busy_threshold=8, busy_window_s=60.0)
    first = asyncio.ensure_future(c.call("a"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second = asyncio.ensure_future(c.call("b"))  # 1 in flight < 8: sent on the next turn
    for x in ("a", "b"):
        s.gate(x).set()
    assert await asyncio.wait_for(asyncio.gather(first, second), 5) == ["A", "B"]


async def test_under_load_a_window_gathers_later_callers() -> None:
    s = Senders()
    c = Coalescer(s.send_one, s.send_many, busy_threshold=1, busy_window_s=0.05)
    first = asyncio.ensure_future(c.call("a"))
    while not s.one:
        await asyncio.sleep(0)
    late = [asyncio.ensure_future(c.call(x)) for x in ("b", "c")]
    for x in ("a", "b", "c"):
        s.gate(x).set()
    assert await asyncio.wait_for(asyncio.gather(first, *late), 5) == ["A", "B", "C"]
    assert s.many == [["b", "c"]]


async def test_a_failed_trip_fails_every_caller_in_it() -> None:
    async def boom(reqs: list[str]) -> AsyncIterator[tuple[int, str]]:
        raise ConnectionError("replica died")
        yield (0, "")  # pragma: no cover - makes this an async generator

    c = Coalescer(Senders().send_one, boom, busy_threshold=1, busy_window_s=0.0)
    results = await asyncio.gather(c.call("a"), c.call("b"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_trip_that_ends_early_fails_the_unanswered() -> None:
    async def short(reqs: list[str]) -> AsyncIterator[tuple[int, str]]:
        yield 1, "only b"

    c = Coalescer(Senders().send_one, short, busy_threshold=1, busy_window_s=0.0)
    a, b = await asyncio.gather(c.call("a"), c.call("b"), return_exceptions=True)
    assert b == "only b"
    with pytest.raises(RuntimeError, match="fewer calls"):
        raise a
