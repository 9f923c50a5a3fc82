"""The ingress replica's side of one model type's picker deployment: plans asked for (calls
made together share one trip), plans made ahead and kept for the next requests, a slot plan's
next provider, and reports delivered to the replica that booked the plans they are about
(pickers/owner.py routes them)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from ray.serve.handle import DeploymentHandle

from serve_app.core.schemas import RequestMeta
from serve_app.ingress.coalesce import Coalescer
from serve_app.ingress.outcomes import Reporter
from serve_app.pickers.plan import Plan, Report, Spare

PlanCall = tuple[RequestMeta, Sequence[int], int]
Key = tuple[str, str]  # (model type, picker replica)
T = TypeVar("T")

# How long a plan made ahead stays usable: the picker's choice is at most this old when used.
GRANT_S = 0.05
# A picker replica that made no plan for this long is left out of flow control's choice.
HEARD_S = 10.0


class _Spares:
    """One model's plans made ahead, oldest first, and how many requests the model had in the
    last GRANT_S (how many to ask for next)."""

    def __init__(self) -> None:
        self.plans: deque[tuple[float, str, Spare]] = deque()  # (usable until, picker, plan)
        self.window = 0.0
        self.count = 0
        self.last = 0
        self.asking = False  # a plan call that asked for some is under way

    def tick(self, now: float) -> None:
        """Counts a request of the model."""
        if now - self.window >= GRANT_S:
            self.last = self.count if now - self.window < 2 * GRANT_S else 0
            self.window, self.count = now, 0
        self.count += 1

    def wanted(self) -> int:
        """How many plans to ask for ahead of the next GRANT_S: as many as the last GRANT_S had
        requests, less this one and those held, and none while another call is asking (a
        burst of calls must not each ask)."""
        if self.asking:
            return 0
        return max(self.last - 1 - len(self.plans), 0)


class PickerLink:
    def __init__(self, model_type: str, handle: DeploymentHandle, reporter: Reporter[Key]) -> None:
        self.model_type = model_type
        self._reporter = reporter
        one = handle.options(method_name="plan")
        many = handle.options(method_name="plan_many", stream=True)

        async def send_one(call: PlanCall) -> Plan:
            return await one.remote(*call)

        def send_many(calls: list[PlanCall]) -> AsyncIterator[tuple[int, Plan]]:
            return many.remote(calls)

        self._plans: Coalescer[PlanCall, Plan] = Coalescer(send_one, send_many)
        self._next = handle.options(method_name="next")
        self._wait = handle.options(method_name="wait")
        self._plan_at = handle.options(method_name="plan_at")
        # Flow control: this replica's waits under way per picker replica, and when each
        # picker replica was last heard of (it made a plan).
        self._waits: Counter[str] = Counter()
        self._heard: dict[str, float] = {}
        self._report = handle.options(method_name="report")
        self._spares: dict[str, _Spares] = {}
        self._epoch = 0  # config changes seen (plans made ahead before one are not used)

    async def plan(self, meta: RequestMeta, prefix: Sequence[int], slot: bool = False) -> Plan:
        """`slot`: the model's strategy takes slots (first_available*), so the plan call may
        wait at the picker for one: that call stays in the request, and Serve cancels it there
        when the client leaves (a slot granted too late goes back: `abandoned`). Every other
        call is _kept."""
        if self._waits:  # the model type is full somewhere: the replica least waited on
            target = self._least_waited()
            with self._waiting_on(target):  # counted at once: a burst must not all go there
                plan = await self._kept(lambda: self._plan_at.remote(target, meta, prefix))
                return self._heard_of(plan)
        if meta.prefer:  # planned for its preferred provider, never from plans made ahead
            return self._heard_of(await self._planned((meta, prefix, 0), slot))
        now = time.monotonic()
        spares = self._spares.get(meta.model)
        if spares is None:
            spares = self._spares[meta.model] = _Spares()
        spares.tick(now)
        self._drop_stale(spares, now)
        while spares.plans:
            _, picker, spare = spares.plans.popleft()
            if _fits(spare, meta):
                return Plan(spare.plan_id, picker, spare.targets)
            self._reporter.closed((self.model_type, picker), spare.plan_id)
        epoch = self._epoch
        want = spares.wanted()
        spares.asking = spares.asking or want > 0
        try:
            plan = self._heard_of(await self._planned((meta, prefix, want), slot))
        finally:
            if want:
                spares.asking = False
        until = time.monotonic() + GRANT_S
        for spare in plan.spares:
            key = (self.model_type, plan.picker)
            self._reporter.opened(key, spare.plan_id)
            if epoch == self._epoch:
                self._spares[meta.model].plans.append((until, plan.picker, spare))
            else:  # made on the config before the last change
                self._reporter.closed(key, spare.plan_id)
        return plan

    def reset(self) -> None:
        """The config changed: every plan made ahead on the old one is given back."""
        self._epoch += 1
        for spares in self._spares.values():
            for _, picker, spare in spares.plans:
                self._reporter.closed((self.model_type, picker), spare.plan_id)
        self._spares = {}

    def failed(self, model: str, provider: str) -> None:
        """A provider failed: plans made ahead that start with it are given back (the picker
        now knows better)."""
        spares = self._spares.get(model)
        if spares is None:
            return
        kept: deque[tuple[float, str, Spare]] = deque()
        for entry in spares.plans:
            if entry[2].targets[0].id == provider:
                self._reporter.closed((self.model_type, entry[1]), entry[2].plan_id)
            else:
                kept.append(entry)
        spares.plans = kept

    def sweep(self) -> None:
        """Gives back the plans made ahead that were not used in time."""
        now = time.monotonic()
        for spares in self._spares.values():
            self._drop_stale(spares, now)

    def _drop_stale(self, spares: _Spares, now: float) -> None:
        while spares.plans and spares.plans[0][0] < now:
            _, picker, spare = spares.plans.popleft()
            self._reporter.closed((self.model_type, picker), spare.plan_id)

    async def next(self, plan: Plan) -> Plan:
        return await self._next.remote(plan.picker, plan.plan_id)

    async def wait(self, plan: Plan) -> Plan:
        """A queued plan's real one, once its request may go (a call of its own: the client
        leaving cancels it, and the request leaves the picker's queue)."""
        with self._waiting_on(plan.picker):
            try:
                return self._heard_of(
                    await self._kept(lambda: self._wait.remote(plan.picker, plan.plan_id))
                )
            except asyncio.CancelledError:
                # The report takes the ticket out of the queue (the wait call goes on: _kept).
                self._reporter.closed((self.model_type, plan.picker), plan.plan_id, at_once=True)
                raise

    async def _planned(self, call: PlanCall, slot: bool) -> Plan:
        return await (
            self._plans.call(call) if slot else self._kept(lambda: self._plans.call(call))
        )

    async def _kept(self, call: Callable[[], Awaitable[Plan]]) -> Plan:
        """The answer of a plan, plan_at or wait call, made outside the request's context.
        Serve cancels the calls a request made when its client leaves; a call the picker had
        already answered then loses its answer, and what the picker booked for it (a plan and
        its plans made ahead, or a queue ticket) would come back to nobody, holding a provider
        for PLAN_TTL_S or a place in the queue for UNCLAIMED_S. So the call goes on, and what
        it brings back after its client left is reported done at once."""
        return await answer_or_give_back(call, self._give_back)

    def _give_back(self, plan: Plan) -> None:
        key = (self.model_type, plan.picker)
        for plan_id in (plan.plan_id, *(spare.plan_id for spare in plan.spares)):
            if plan_id:
                self._reporter.closed(key, plan_id, at_once=True)

    @contextlib.contextmanager
    def _waiting_on(self, picker: str) -> Iterator[None]:
        """Counts a call under way to `picker` for flow control's choice (_least_waited)."""
        self._waits[picker] += 1
        try:
            yield
        finally:
            self._waits[picker] -= 1
            if self._waits[picker] <= 0:
                del self._waits[picker]

    def _heard_of(self, plan: Plan) -> Plan:
        if plan.picker:
            self._heard[plan.picker] = time.monotonic()
        return plan

    def _least_waited(self) -> str:
        """While requests wait, new ones go to the picker replica this replica waits on least
        (of those heard of lately), so each replica's queue holds a like share of every
        tenant and fair share holds across replicas (Serve's own choice let one replica's
        queue grow while another's ran dry)."""
        now = time.monotonic()
        live = {p for p, at in self._heard.items() if now - at < HEARD_S} | set(self._waits)
        fewest = min(self._waits.get(p, 0) for p in live)
        return random.choice(sorted(p for p in live if self._waits.get(p, 0) == fewest))

    async def report(self, picker: str, report: Report) -> None:
        await self._report.remote(picker, report)


async def answer_or_give_back(
    call: Callable[[], Awaitable[T]], give_back: Callable[[T], None]
) -> T:
    """Awaits `call()`, run in a context of its own (no cancel of the caller's reaches it); if
    the caller is cancelled first, `call()` goes on and its answer, should one come, goes to
    `give_back`."""

    async def run() -> T:
        return await call()

    task = asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def late(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                give_back(done.result())

        task.add_done_callback(late)
        raise


def _fits(spare: Spare, meta: RequestMeta) -> bool:
    """Whether every provider of a plan made ahead may serve this request (its size, tools)."""
    return all(
        meta.prompt_tokens <= p.input_size and (not meta.needs_tools or p.tool_calling)
        for p in spare.targets
    )
