"""A picker replica's waiting requests (flow control, docs/flow-control.md).

When every provider of a model is full, a plan call does not fail: the request waits in the
model's FairQueue (serve_app/flow) and the call answers at once with a ticket (a queued Plan).
The ingress then calls `wait(ticket)` on this replica (Serve routes it by owner, like a slot
plan's `next`): a call of its own, so a client that leaves cancels it and its request leaves
the queue at once. The moment a booking ends here (capacity frees), or the load signals or the
config change, the queue's next request is planned and its wait answered; a request still
waiting at its deadline (routing `queue_timeout_s`, capped by its own) is a 429
`queue_timeout`; a full queue sheds the lowest priority first (503 `shed`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from serve_app.core.config import RoutingConfig
from serve_app.core.errors import RouterError
from serve_app.core.metrics import Tally
from serve_app.core.schemas import RequestMeta
from serve_app.flow.queue import FairQueue, Waiter, priority_label
from serve_app.pickers.plan import Plan, error_answer

WAIT_METRIC = "llm_router_queue_wait_seconds"
LENGTH_METRIC = "llm_router_queue_length"
# How long an answered wait is kept for an ingress that has not asked for it yet; and how long
# a ticket waits for its ingress's wait call (none came: the ticket's answer never reached its
# ingress, whose client left while the plan call was under way).
UNCLAIMED_S = 5.0


@dataclass(eq=False)
class Waiting:
    ticket: str
    meta: RequestMeta
    prefix: Sequence[int]
    future: asyncio.Future[Plan]
    since: float
    priority: int
    timer: asyncio.TimerHandle | None = None
    asked: asyncio.TimerHandle | None = None  # until its wait call comes


def queue_timeout(model: str, seconds: float) -> RouterError:
    return RouterError(
        429,
        f"every provider of model {model} stayed full for the {seconds:g} s this request may "
        "wait in its queue; retry later",
        type="rate_limit_error",
        code="queue_timeout",
        headers={"retry-after": "1", "x-router-reason": "queue_timeout"},
    )


def shed(model: str) -> RouterError:
    return RouterError(
        503,
        f"the queue of model {model} is full of requests of this priority or higher; retry later",
        type="api_error",
        code="shed",
        headers={"retry-after": "1", "x-router-reason": "shed"},
    )


class Queues:
    def __init__(
        self,
        holder: str,
        tally: Tally,
        plan_now: Callable[[RequestMeta, Sequence[int]], Plan | None],
        give_back: Callable[[str], None],
    ) -> None:
        """`plan_now`: a booked plan for a request, or None while its model is full.
        `give_back`: ends a booked plan nobody will use."""
        self._holder = holder
        self._tally = tally
        self._plan_now = plan_now
        self._give_back = give_back
        self._queues: dict[str, FairQueue[Waiting]] = {}
        self._tickets: dict[str, Waiter[Waiting]] = {}
        self._ids = itertools.count()
        # (model, priority label) ever queued: the gauges.
        self._seen: set[tuple[str, str]] = set()

    def any_waiting(self) -> bool:
        return any(queue.count for queue in self._queues.values())

    def waiting(self, model: str) -> bool:
        queue = self._queues.get(model)
        return queue is not None and queue.count > 0

    def enqueue(self, meta: RequestMeta, prefix: Sequence[int], routing: RoutingConfig) -> Plan:
        """The request waits: a ticket (a queued Plan), or its plan at once if it could go now,
        or the shed error if the queue has no room for it."""
        queue = self._queues.get(meta.model)
        if queue is None:
            queue = self._queues[meta.model] = FairQueue(
                routing.queue_max_requests, routing.queue_max_bytes
            )
        queue.max_count, queue.max_bytes = routing.queue_max_requests, routing.queue_max_bytes
        loop = asyncio.get_running_loop()
        priority = meta.priority if meta.priority is not None else routing.default_priority
        ticket = f"{self._holder}:q{next(self._ids)}"
        item = Waiting(ticket, meta, prefix, loop.create_future(), time.monotonic(), priority)
        waiter = Waiter(item, priority, meta.tenant, meta.weight, meta.size)
        self._seen.add((meta.model, priority_label(priority)))
        for gone in queue.push(waiter):
            self._answer(gone, Plan("", self._holder, (), error=error_answer(shed(meta.model))))
            self._observe(gone.item, "shed")
        if item.future.done():  # itself shed
            return item.future.result()
        self._tickets[ticket] = waiter
        assert routing.queue_timeout_s is not None
        seconds = min(routing.queue_timeout_s, meta.timeout_s or routing.request_timeout_s)
        item.timer = loop.call_later(seconds, self._timed_out, ticket, seconds)
        self.dispatch(meta.model)
        if item.future.done():  # it could go at once after all
            self._claim(ticket)
            return item.future.result()
        item.asked = loop.call_later(UNCLAIMED_S, self.leave, ticket, "unclaimed")
        return Plan(ticket, self._holder, (), queued=True)

    async def wait(self, ticket: str) -> Plan:
        """The plan of a queued request once it may go (or its error); a cancelled wait (its
        client left) takes it out of the queue, and gives back a plan made meanwhile."""
        waiter = self._tickets.get(ticket)
        if waiter is None:
            lost = RouterError(503, "the queued request is unknown here; retry", type="api_error")
            return Plan(ticket, self._holder, (), error=error_answer(lost))
        if waiter.item.asked is not None:
            waiter.item.asked.cancel()
        try:
            return await asyncio.shield(waiter.item.future)
        except asyncio.CancelledError:
            self.leave(ticket)
            raise
        finally:
            self._claim(ticket)

    def leave(self, ticket: str, outcome: str = "left") -> None:
        """The request's client left: out of the queue, and a plan made meanwhile goes back.
        Its wait being cancelled says so, its ingress's report too (outcome `left`), and a
        ticket nobody asked for within UNCLAIMED_S (`unclaimed`: its answer reached no
        ingress, which should not happen; the metric shows whether it does)."""
        waiter = self._tickets.get(ticket)
        if waiter is None:
            return
        future = waiter.item.future
        if future.done():
            if plan_id := future.result().plan_id:
                self._give_back(plan_id)
        else:
            self._queues[waiter.item.meta.model].remove(waiter)
            self._answer(waiter, Plan(ticket, self._holder, ()))
            self._observe(waiter.item, outcome)
        self._claim(ticket)

    def dispatch(self, model: str) -> None:
        """Plans the model's waiting requests, in the queue's order, while its providers have
        room."""
        queue = self._queues.get(model)
        while queue:
            waiter = queue.peek()
            assert waiter is not None
            plan = self._plan_now(waiter.item.meta, waiter.item.prefix)
            if plan is None:
                return
            queue.pop()
            self._answer(waiter, plan)
            self._observe(waiter.item, "dispatched" if plan.error is None else "error")

    def dispatch_all(self) -> None:
        for model in list(self._queues):
            self.dispatch(model)

    def lengths(self) -> dict[tuple[str, str], int]:
        """Requests waiting by (model, priority label), zeros included for those seen before."""
        out = dict.fromkeys(self._seen, 0)
        for model, queue in self._queues.items():
            for priority, count in queue.by_priority().items():
                label = (model, priority_label(priority))
                out[label] = out.get(label, 0) + count
        return out

    def _timed_out(self, ticket: str, seconds: float) -> None:
        waiter = self._tickets.get(ticket)
        if waiter is None:
            return
        item = waiter.item
        if item.future.done():  # answered, never claimed (its ingress is gone)
            self._tickets.pop(ticket, None)
            if plan_id := item.future.result().plan_id:
                self._give_back(plan_id)
            return
        self._queues[item.meta.model].remove(waiter)
        error = error_answer(queue_timeout(item.meta.model, seconds))
        self._answer(waiter, Plan(ticket, self._holder, (), error=error))
        self._observe(item, "timeout")

    def _answer(self, waiter: Waiter[Waiting], plan: Plan) -> None:
        item = waiter.item
        if not item.future.done():
            item.future.set_result(plan._replace(waited=time.monotonic() - item.since))
        if item.ticket in self._tickets:  # unclaimed answers go after a while
            if item.timer is not None:
                item.timer.cancel()
            loop = asyncio.get_running_loop()
            item.timer = loop.call_later(UNCLAIMED_S, self._timed_out, item.ticket, 0.0)

    def _claim(self, ticket: str) -> None:
        waiter = self._tickets.pop(ticket, None)
        if waiter is not None:
            for timer in (waiter.item.timer, waiter.item.asked):
                if timer is not None:
                    timer.cancel()

    def _observe(self, item: Waiting, outcome: str) -> None:
        labels = (item.meta.model, priority_label(item.priority), outcome)
        self._tally.observe(WAIT_METRIC, labels, time.monotonic() - item.since)
