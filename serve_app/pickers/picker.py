"""A model type's picker: it plans each request and books what it planned until the ingress
says the request is done; it learns from each outcome the ingress reports.

What it decides with: the model's strategy, this replica's in-flight counts, the counts and
slot leases shared with the other picker replicas (SharedState), the prefix index, cooldowns
and circuits. It never sees a body or an answer's bytes: the ingress carries them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from serve_app.core.config import SLOT_STRATEGIES, ProviderConfig, RoutingConfig
from serve_app.core.errors import RouterError
from serve_app.core.metrics import Tally
from serve_app.core.schemas import RequestMeta
from serve_app.pickers.handler import ModelHandler
from serve_app.pickers.plan import DONE, OK, Event, Plan, Report, Spare, error_answer
from serve_app.pickers.queues import Queues
from serve_app.pickers.shared import SharedState, Slot
from serve_app.routing.selection import Candidates, ProviderState, preferred_first
from serve_app.routing.strategies import KvView

# A plan its ingress stops listing as open (the ingress replica died, or its reports are lost)
# comes back after this long; an ingress lists its open plans every RENEW_S (ingress/outcomes).
PLAN_TTL_S = 5.0
# The longest an upstream's Retry-After keeps it aside.
MAX_RETRY_AFTER_S = 300.0
# The most plans made ahead in one call (Plan.spares).
MAX_SPARES = 32
# Strategies whose choice depends on the request itself (its prompt, its session) or that hold
# an exclusive slot: every request of theirs is planned when it comes.
NO_SPARES = SLOT_STRATEGIES | {"prefix_affinity", "session_affinity", "kv_aware"}
# The error of a model whose every provider is at its max_concurrency (flow control waits).
FULL = "all_providers_busy"


@dataclass
class _Booking:
    """What one plan holds: this replica's in-flight count on the provider under way, a slot
    (first_available*), and the upstream model names it may use (retiring adapter versions)."""

    plan_id: str
    handler: ModelHandler
    meta: RequestMeta
    targets: list[ProviderConfig]
    paths: set[str]
    prefix: Sequence[int]
    expires: float
    current: ProviderConfig | None = None
    slot: Slot | None = None
    tiers: list[list[ProviderConfig]] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    left: int = 0  # slot attempts left (max_attempts per tier with providers)
    deadline: float = 0.0  # the request's deadline, on the event loop's clock
    # kv_aware: the prompt tokens each target's engine is predicted to serve from its cache,
    # and the ones the current one has to compute until its answer begins (queued prefill).
    hits: dict[str, int] | None = None
    prefill: int = 0


def no_free_provider(model: str, wait_s: float) -> RouterError:
    return RouterError(
        503,
        f"no provider of model {model} came free within {wait_s:g} s",
        type="api_error",
        code="no_free_provider",
        headers={"retry-after": "1"},
    )


def retry_seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("inf")


class Picker:
    def __init__(
        self,
        holder: str,
        handler: ModelHandler,
        routing: RoutingConfig,
        on_trip: Callable[[str, str], None] = lambda provider_id, reason: None,
        shared: SharedState | None = None,
        plan_ttl_s: float = PLAN_TTL_S,
        kv: KvView | None = None,
    ) -> None:
        """`holder`: this replica's id (plans name it). `on_trip(provider_id, reason)`: a
        provider failed `circuit_failures` times in a row. `shared`: the state shared with the
        other replicas (without it, first_available* order by config and hold nothing). `kv`:
        what the engines hold (kv_aware)."""
        self.holder = holder
        self.kv = kv
        self._ttl = plan_ttl_s
        self.on_trip = on_trip
        self.shared = shared
        # Requests under way per upstream model name (model_path): tells when nothing uses a
        # retiring adapter version any more.
        self.in_use: Counter[str] = Counter()
        self.plans: dict[str, _Booking] = {}
        self._ids = itertools.count()
        self.handler = handler
        self.routing = routing
        self.tally = shared.tally if shared is not None else Tally()
        self.queues = Queues(holder, self.tally, self._plan_now, self.done)

    def update(self, handler: ModelHandler, routing: RoutingConfig) -> None:
        """Plan new requests with a new config; booked plans keep the view they were made on."""
        self.handler, self.routing = handler, routing
        self.queues.dispatch_all()  # the new config may have room for some

    # --- planning ----------------------------------------------------------------------------

    async def plan(self, meta: RequestMeta, prefix: Sequence[int], spares: int = 0) -> Plan:
        """The request's plan, booked; an error answer when it can go nowhere. `prefix`: the
        prompt's KV block keys (kv_aware; its text block hashes come in meta). `spares`: how
        many plans the ingress would like made ahead for its next requests of this model (see
        Plan.spares). With flow control on, a request whose model is full waits (a queued
        Plan: queues.py)."""
        handler, routing = self.handler, self.routing
        strategy = handler.strategy_names.get(meta.model)
        if routing.queue_timeout_s is not None and strategy not in (None, *SLOT_STRATEGIES):
            if not self.queues.waiting(meta.model):
                plan = self._plan_now(meta, prefix)
                if plan is not None:
                    return plan
            return self.queues.enqueue(meta, prefix, routing)
        try:
            candidates = handler.candidates(meta)
        except RouterError as err:
            return Plan("", self.holder, (), error=error_answer(err))
        booking = self._book(meta, prefix, candidates)
        if self.shared is not None and strategy in SLOT_STRATEGIES:
            plan_id = booking.plan_id
            try:
                provider = await self._next_slot(booking, failed=False)
            except RouterError as err:
                self.done(plan_id)
                return Plan("", self.holder, (), error=error_answer(err))
            except BaseException:
                self.done(plan_id)  # the plan call was cancelled while it waited
                raise
            return Plan(plan_id, self.holder, (provider,) if provider else (), more=True)
        return self._ordered(booking, candidates, spares)

    def _plan_now(self, meta: RequestMeta, prefix: Sequence[int]) -> Plan | None:
        """Flow control's plan: booked if a provider has room, None while every one is full
        (its in-flight at max_concurrency, or its load at routing `max_load`)."""
        strategy = self.handler.strategy_names.get(meta.model)
        if self.routing.queue_timeout_s is None or strategy in SLOT_STRATEGIES:
            # The config changed under a waiting request: its new routing decides afresh.
            changed = RouterError(
                503,
                f"the routing of model {meta.model} changed while the request waited; retry",
                type="api_error",
                code="routing_changed",
                headers={"retry-after": "1"},
            )
            return Plan("", self.holder, (), error=error_answer(changed))
        try:
            candidates = self.handler.candidates(meta)
        except RouterError as err:
            if err.code == FULL:
                return None
            return Plan("", self.holder, (), error=error_answer(err))
        roomy = self.handler.with_room(meta, candidates, self.routing.max_load)
        if roomy is None:
            return None
        return self._ordered(self._book(meta, prefix, roomy), roomy, 0)

    async def wait(self, ticket: str) -> Plan:
        """A queued request's plan once it may go (see queues.py)."""
        return await self.queues.wait(ticket)

    def _book(self, meta: RequestMeta, prefix: Sequence[int], candidates: Candidates) -> _Booking:
        """A new booking of the request (nothing held yet)."""
        handler, routing = self.handler, self.routing
        plan_id = f"{self.holder}:{next(self._ids)}"
        timeout = min(routing.request_timeout_s, meta.timeout_s or float("inf"))
        booking = _Booking(
            plan_id=plan_id,
            handler=handler,
            meta=meta,
            targets=[],
            paths={p.model_path for tier in candidates.tiers for p in tier if p.model_path},
            prefix=prefix,
            expires=time.monotonic() + self._ttl,
            tiers=candidates.tiers,
            left=routing.max_attempts * sum(1 for tier in candidates.tiers if tier),
            deadline=asyncio.get_running_loop().time() + timeout,
        )
        self.in_use.update(booking.paths)
        self.plans[plan_id] = booking
        return booking

    def _ordered(self, booking: _Booking, candidates: Candidates, spares: int) -> Plan:
        """The booking's providers in its strategy's order, the first held; and `spares` plans
        made ahead where they may be."""
        handler, meta, plan_id = booking.handler, booking.meta, booking.plan_id
        strategy = handler.strategy_names[meta.model]
        stats = handler.stats(meta, candidates, booking.prefix, self.shared, self.kv)
        booking.targets = handler.order(meta.model, candidates, stats)
        if meta.prefer:
            booking.targets = preferred_first(booking.targets, candidates, meta.prefer)
        hits: tuple[int, ...] = ()
        if stats.held is not None:
            booking.hits = dict(stats.held)
            hits = tuple(booking.hits.get(p.id, 0) for p in booking.targets)
        if booking.targets:
            self._hold(booking, booking.targets[0])
        ahead: list[Spare] = []
        providers = [p for tier in candidates.tiers for p in tier]
        if (
            spares > 0
            and not meta.prefer
            and self.routing.queue_timeout_s is None  # flow control counts every booking
            and booking.targets
            and strategy not in NO_SPARES
            and not candidates.last_resort
            and all(p.max_concurrency is None for p in providers)
        ):
            for _ in range(min(spares, MAX_SPARES)):
                ahead.append(self._spare(booking, candidates))
        return Plan(plan_id, self.holder, tuple(booking.targets), spares=tuple(ahead), hits=hits)

    def _spare(self, like: _Booking, candidates: Candidates) -> Spare:
        """One more plan like `like`, booked now, in the strategy's order as it stands."""
        handler, meta = like.handler, like.meta
        plan_id = f"{self.holder}:{next(self._ids)}"
        stats = handler.stats(meta, candidates, (), self.shared)
        booking = _Booking(
            plan_id=plan_id,
            handler=handler,
            meta=meta,
            targets=handler.order(meta.model, candidates, stats),
            paths=like.paths,
            prefix=(),
            expires=like.expires,
        )
        self.in_use.update(booking.paths)
        self.plans[plan_id] = booking
        self._hold(booking, booking.targets[0])
        return Spare(plan_id, tuple(booking.targets))

    async def next(self, plan_id: str) -> Plan:
        """A slot plan's next provider, after the ones it gave failed (no targets: none)."""
        booking = self.plans.get(plan_id)
        if booking is None:
            return Plan(plan_id, self.holder, ())
        self._let_go(booking)
        provider = await self._next_slot(booking, failed=True)
        return Plan(plan_id, self.holder, (provider,) if provider else (), more=True)

    async def _next_slot(self, booking: _Booking, failed: bool) -> ProviderConfig | None:
        """A slot on the best free provider not tried yet, waiting up to wait_timeout_s; with no
        failure yet, none coming free is an error (no_free_provider)."""
        assert self.shared is not None
        tiers = [[p for p in tier if p.id not in booking.tried] for tier in booking.tiers]
        if booking.left <= 0 or not any(tiers):
            return None
        booking.left -= 1
        model = booking.meta.model
        wait = min(
            self.routing.wait_timeout_s, booking.deadline - asyncio.get_running_loop().time()
        )
        strategy = booking.handler.strategy_names[model]
        booking.expires = float("inf")  # not given back while it waits (nobody lists it yet)
        try:
            slot = await self.shared.acquire(model, strategy, tiers, wait)
        finally:
            booking.expires = time.monotonic() + self._ttl
        if self.plans.get(booking.plan_id) is not booking:  # done while it waited
            if slot is not None:
                self.shared.release(slot)
            return None
        if slot is None:
            if failed:
                return None
            raise no_free_provider(model, max(wait, 0.0))
        booking.slot = slot
        provider = next(p for tier in tiers for p in tier if p.id == slot.provider)
        self._hold(booking, provider)
        return provider

    def _hold(self, booking: _Booking, provider: ProviderConfig) -> None:
        booking.current = provider
        booking.tried.add(provider.id)
        state = booking.handler.states.get(provider.id)
        if state is not None:
            state.in_flight += 1
            if booking.hits is not None:
                booking.prefill = booking.meta.prompt_tokens - booking.hits.get(provider.id, 0)
                state.queued_prefill += booking.prefill
        if self.shared is not None:
            self.shared.used(booking.meta.model, provider.id)

    def _let_go(self, booking: _Booking) -> None:
        if booking.current is not None:
            state = booking.handler.states.get(booking.current.id)
            if state is not None:
                state.in_flight -= 1
                self._prefilled(booking, state)
            booking.current = None
        if booking.slot is not None:
            assert self.shared is not None
            self.shared.release(booking.slot)
            booking.slot = None

    # --- outcomes ----------------------------------------------------------------------------

    def report(self, report: Report) -> None:
        """An ingress replica's outcomes, and the plans it still has under way."""
        for event in report.events:
            if event.outcome == DONE:
                self.done(event.plan_id)
            elif event.outcome == OK:
                self._answered(event)
            else:
                self._failed(event)
        expires = time.monotonic() + self._ttl
        for plan_id in report.open:
            booking = self.plans.get(plan_id)
            if booking is not None:
                booking.expires = expires

    def done(self, plan_id: str) -> None:
        booking = self.plans.pop(plan_id, None)
        if booking is None:  # a queued request's ticket: its client left
            self.queues.leave(plan_id)
        else:
            self._let_go(booking)
            self.in_use.subtract(booking.paths)
            if self.queues.any_waiting():  # its room goes to the next waiting (of any model
                self.queues.dispatch_all()  # using the provider: an adapter shares its base's)

    def expire(self) -> int:
        """Gives back the plans no ingress listed for PLAN_TTL_S; how many there were."""
        now = time.monotonic()
        gone = [pid for pid, b in self.plans.items() if b.expires < now]
        for plan_id in gone:
            self.done(plan_id)
        return len(gone)

    def _answered(self, event: Event) -> None:
        """The provider's answer began: it is well, its latency (to the answer's head) is one
        sample, and it has the prompt's text blocks in its cache now (the prefix index)."""
        state = self.handler.states.get(event.provider)
        booking = self.plans.get(event.plan_id)
        if state is not None:
            state.down_until, state.failures = 0.0, 0
            current = booking.current if booking is not None else None
            if booking is not None and current is not None and current.id == event.provider:
                self._prefilled(booking, state)
        if self.shared is not None:
            self.shared.took(event.provider, event.seconds)
            if booking is not None:
                self.shared.routed(event.provider, booking.meta.text_blocks)

    @staticmethod
    def _prefilled(booking: _Booking, state: ProviderState) -> None:
        """The booking's prompt no longer waits to be computed there (its answer began, or the
        provider was let go)."""
        state.queued_prefill -= booking.prefill
        booking.prefill = 0

    def _failed(self, event: Event) -> None:
        state = self.handler.states.get(event.provider)
        if state is not None:
            pause = self.routing.unhealthy_cooldown_s
            if event.retry_after is not None:  # the upstream said when to come back: believe it
                pause = min(max(retry_seconds(event.retry_after), 0.0), MAX_RETRY_AFTER_S)
            if event.status != 404:  # a missing adapter version says nothing of the server
                state.down_until = self.handler.clock() + pause
            if event.status not in (404, 429):  # nor is busy broken
                state.failures += 1
                if state.failures >= self.routing.circuit_failures:
                    state.failures = 0
                    self.on_trip(event.provider, event.outcome)
        booking = self.plans.get(event.plan_id)
        if booking is None or booking.current is None or booking.current.id != event.provider:
            return
        # The ingress goes on to the plan's next provider: the booking follows it.
        self._let_go(booking)
        ids = [p.id for p in booking.targets]
        if event.provider in ids and ids.index(event.provider) + 1 < len(ids):
            self._hold(booking, booking.targets[ids.index(event.provider) + 1])
