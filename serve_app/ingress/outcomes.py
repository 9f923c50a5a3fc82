"""An ingress replica's reports to the pickers: each plan's outcomes, batched per picker replica
and sent off the request path, and the plans still under way.

A picker books what it plans (in-flight counts, slots, adapter versions in use) until it hears
the plan is done; it gives back a plan no ingress has listed as open for PLAN_TTL_S, so the
bookings of an ingress replica that died come back within PLAN_TTL_S + RENEW_S. Nothing here
knows about Ray: the sender is injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from serve_app.pickers.plan import DONE, Event, Report

log = logging.getLogger("ray.serve")

# How long events wait to go out with others: a picker sees a request end this much later at
# most (plus the call), which its in-flight counts and slot waits can bear.
FLUSH_S = 0.02
# How often the plans under way are listed again.
RENEW_S = 1.0
SEND_TIMEOUT_S = 2.0
# A picker that does not take its reports loses the oldest events beyond this many.
MAX_PENDING = 10_000

K = TypeVar("K", bound=Hashable)


class Reporter(Generic[K]):
    def __init__(self, holder: str, send: Callable[[K, Report], Awaitable[None]]) -> None:
        """`send(key, report)`: delivers a report to the picker replica `key` names."""
        self._holder = holder
        self._send = send
        self._events: dict[K, list[Event]] = {}
        self._open: dict[K, set[str]] = {}
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop())
        self._renewer = loop.create_task(self._renew())

    def opened(self, key: K, plan_id: str) -> None:
        self._open.setdefault(key, set()).add(plan_id)

    def event(self, key: K, event: Event, at_once: bool = False) -> None:
        """`at_once`: send it (with the events waiting for the same picker) now, not with the
        next batch: a failure (the next request must not be planned onto a provider that just
        failed), a slot plan's end (its provider is exclusive until the picker hears it is
        free)."""
        events = self._events.setdefault(key, [])
        events.append(event)
        if len(events) > MAX_PENDING:
            del events[0]
        if not at_once:
            self._due.set()
            return
        # In a context of its own: Serve cancels a request's calls when its client leaves, and
        # this report carries other requests' outcomes too.
        task = asyncio.get_running_loop().create_task(
            self._deliver(key, self._events.pop(key)), context=contextvars.Context()
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def closed(self, key: K, plan_id: str, at_once: bool = False) -> None:
        """The plan is done (see `event` for `at_once`)."""
        plans = self._open.get(key)
        if plans is not None:
            plans.discard(plan_id)
            if not plans:
                del self._open[key]
        self.event(key, Event(plan_id, "", DONE), at_once)

    def open_plans(self) -> int:
        return sum(len(p) for p in self._open.values())

    async def _loop(self) -> None:
        while True:
            await self._due.wait()
            await asyncio.sleep(FLUSH_S)
            self._due.clear()
            try:
                await self.flush()
            except Exception:  # never stop reporting: the next flush retries what it can
                log.exception("picker reports failed")

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            for key in self._open:
                self._events.setdefault(key, [])
            if self._events:
                self._due.set()

    async def flush(self) -> None:
        """Sends every picker its pending events and open plans, one call each, at once."""
        pending, self._events = self._events, {}
        await asyncio.gather(*(self._deliver(key, events) for key, events in pending.items()))

    async def _deliver(self, key: K, events: list[Event]) -> None:
        report = Report(self._holder, events, sorted(self._open.get(key, ())))
        try:
            await asyncio.wait_for(self._send(key, report), SEND_TIMEOUT_S)
        except Exception as exc:
            log.warning(
                "picker report not delivered", extra={"picker": str(key), "reason": repr(exc)}
            )
            if key in self._open:  # it may come back; else the picker is gone with its plans
                self._events[key] = [*events, *self._events.get(key, [])][-MAX_PENDING:]

    async def stop(self) -> None:
        """Stops the loops after a last flush (a replica shutting down)."""
        for task in (self._task, self._renewer):
            if task is not None:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), SEND_TIMEOUT_S)
