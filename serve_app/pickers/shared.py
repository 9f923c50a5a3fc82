"""A router replica's side of the shared provider state: a local copy of the broker's snapshot,
the slots this replica holds, and the counts it has not sent yet.

Why local: a call to the broker costs about a millisecond, more than the whole routing decision.
Use counts and latency samples go out in one batch every COUNTS_S; held slots are renewed, and
idle ones given back, in the same call. While no other replica takes slots of the same
providers, a slot whose request ended stays with this replica for LINGER_S, so the next request
here takes it without a call (the steady state of one replica: no call per request). When other
replicas compete, or a request waits, every slot is taken from the broker and given back at
once, so the broker's order and first come, first served hold across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ray.actor import ActorHandle

from serve_app.cluster.broker import (
    DEFAULT_TERMS,
    AcquireRequest,
    Grant,
    SlotSpec,
    Snapshot,
    SyncRequest,
    Terms,
)
from serve_app.cluster.follow import ActorLink
from serve_app.core.config import ProviderConfig, StrategyName
from serve_app.core.metrics import Tally
from serve_app.routing.prefix import IndexDelta, PrefixIndex
from serve_app.routing.strategies import Stats, capacity, slot_order

LINGER_S = 0.05  # also how often idle slots are looked at
COUNTS_S = 0.5  # use counts and latency samples go out this often
INDEX_S = 0.2  # text prefixes: routed chains go out, and others' come in, this often
CALL_TIMEOUT_S = 5.0
RETRY_S = 0.2
TAKES_METRIC = "llm_router_slot_takes"


class Slot(NamedTuple):
    lease_id: str
    provider: str


@dataclass
class _Held:
    provider: str
    busy: bool
    idle_since: float = 0.0


class SharedState:
    def __init__(
        self, connect: Callable[[], ActorHandle], holder: str, tally: Tally | None = None
    ) -> None:
        """`connect` returns the broker's handle, creating the broker if it is gone; `tally`
        counts where slots came from."""
        self.holder = holder
        self.tally = tally or Tally()
        self.snapshot = Snapshot()
        self._link = ActorLink(connect, holder, "broker")
        self._providers: list[str] = []
        self._models: list[str] = []
        self._terms = DEFAULT_TERMS
        self._held: dict[str, _Held] = {}
        self._release: list[str] = []
        self._uses: dict[str, Counter[str]] = {}
        self._latency: dict[str, tuple[float, int]] = {}
        self._waiting = 0
        self._next_renew = 0.0
        self._next_counts = 0.0
        self._next_index = 0.0
        self._task: asyncio.Task[None] | None = None
        # Text prefixes (prefix_affinity, kv_aware's providers without KV events): every
        # replica's recently routed prompt blocks per provider, this replica's not sent yet,
        # and the broker's index sequence seen (None: not followed).
        self.index = PrefixIndex(self._terms.index_entries)
        self._routed: list[tuple[str, Sequence[int]]] = []
        self._index_seq: int | None = None

    def configure(
        self,
        providers: Sequence[str],
        models: Sequence[str],
        terms: Terms,
        follow_index: bool = False,
    ) -> None:
        """The providers and models this replica routes to (their shared state comes back);
        `follow_index`: a model routes by prompt prefix (the index is kept in step)."""
        self._providers, self._models, self._terms = list(providers), list(models), terms
        self.index.resize(terms.index_entries)
        self.index.keep_only(providers)
        if not follow_index:
            self._index_seq = None
        elif self._index_seq is None:
            self._index_seq = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    # --- counts ------------------------------------------------------------------------------

    def stats(self, model: str, in_flight: dict[str, int]) -> Stats:
        shared = self.snapshot.uses.get(model, {})
        local = self._uses.get(model)
        uses = shared if not local else {p: shared.get(p, 0) + local[p] for p in {*shared, *local}}
        return Stats(in_flight=in_flight, uses=uses, latency=self.snapshot.latency)

    def used(self, model: str, provider: str) -> None:
        self._uses.setdefault(model, Counter())[provider] += 1

    def took(self, provider: str, seconds: float) -> None:
        total, count = self._latency.get(provider, (0.0, 0))
        self._latency[provider] = (total + seconds, count + 1)

    def routed(self, provider: str, chain: Sequence[int]) -> None:
        """A prompt with these block hashes went to `provider` (it now likely caches them)."""
        if chain and self._index_seq is not None:
            self.index.add(provider, chain)
            self._routed.append((provider, chain))

    # --- slots -------------------------------------------------------------------------------

    async def acquire(
        self,
        model: str,
        strategy: StrategyName,
        tiers: Sequence[Sequence[ProviderConfig]],
        wait_s: float,
    ) -> Slot | None:
        """A slot on the best provider of `tiers` with one free, waiting up to `wait_s`;
        None when none came free."""
        slot, free = self._take_idle(model, strategy, tiers)
        if slot is not None:
            self.tally.inc(TAKES_METRIC, ("local",))
            return slot
        idle = [lid for lid, h in self._held.items() if not h.busy]
        for lid in idle:
            del self._held[lid]
        request = AcquireRequest(
            holder=self.holder,
            model=model,
            strategy=strategy,
            tiers=[[SlotSpec(p.id, p.nworkers, p.host_key) for p in tier] for tier in tiers],
            wait_s=wait_s,
            terms=self._terms,
            providers=self._providers,
            models=self._models,
            release=idle,
        )
        deadline = time.monotonic() + wait_s
        # Nothing looked free: this request will likely wait, and slots ending here go back.
        self._waiting += not free
        try:
            while True:
                call = asyncio.ensure_future(self._ask(request))
                try:
                    grant = await asyncio.wait_for(
                        asyncio.shield(call), request.wait_s + CALL_TIMEOUT_S
                    )
                    break
                except BaseException as exc:
                    # The broker may still grant the slot: whenever it does, it goes back.
                    call.add_done_callback(self._give_back_late)
                    if not isinstance(exc, Exception):
                        raise  # the request was cancelled (its client left)
                    self._link.lost(exc)  # broker gone or slow: retry within the wait
                    request.release = []
                    request.wait_s = deadline - time.monotonic()
                    if request.wait_s <= 0:
                        self.tally.inc(TAKES_METRIC, ("timeout",))
                        return None
                    await asyncio.sleep(RETRY_S)
        finally:
            self._waiting -= not free
        self.snapshot = grant.snapshot
        if grant.lease_id is None or grant.provider is None:
            self.tally.inc(TAKES_METRIC, ("timeout",))
            return None
        self.tally.inc(TAKES_METRIC, ("broker",))
        self._held[grant.lease_id] = _Held(grant.provider, busy=True)
        return Slot(grant.lease_id, grant.provider)

    def _take_idle(
        self, model: str, strategy: StrategyName, tiers: Sequence[Sequence[ProviderConfig]]
    ) -> tuple[Slot | None, bool]:
        """A slot this replica already holds, if it is on the provider the strategy would pick
        now by the local view; else (None, whether the local view has a free slot at the
        broker)."""
        busy: Counter[str] = Counter(self.snapshot.others)
        leased: Counter[str] = Counter(self.snapshot.others)
        idle: dict[str, str] = {}
        for lid, held in self._held.items():
            leased[held.provider] += 1
            if held.busy:
                busy[held.provider] += 1
            else:
                idle.setdefault(held.provider, lid)
        keep = self._may_keep()
        for tier in tiers:
            for p in slot_order(strategy, model, tier, busy, self.snapshot.pins):
                lid = idle.get(p.id)
                if lid is not None and keep:
                    self._held[lid].busy = True
                    return Slot(lid, p.id), True
                if lid is not None or leased[p.id] < capacity(strategy, p):
                    return None, True  # the broker gives out the best free slot
        return None, False

    async def _ask(self, request: AcquireRequest) -> Grant:
        return await self._link.get().acquire.remote(request)

    def _give_back_late(self, call: asyncio.Future[Grant]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        lease_id = call.result().lease_id
        if lease_id is not None:
            self._release.append(lease_id)
            self.tally.inc(TAKES_METRIC, ("abandoned",))

    def _may_keep(self) -> bool:
        return self.snapshot.alone and not self.snapshot.contended and not self._waiting

    def release(self, slot: Slot) -> None:
        held = self._held.get(slot.lease_id)
        if held is None:
            return
        if not self._may_keep():
            del self._held[slot.lease_id]
            with contextlib.suppress(Exception):
                self._link.get().release.remote(self.holder, [slot.lease_id])
            return
        held.busy, held.idle_since = False, time.monotonic()

    # --- the batch loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(LINGER_S)
            now = time.monotonic()
            for lid, held in list(self._held.items()):
                if not held.busy and now - held.idle_since >= LINGER_S:
                    del self._held[lid]
                    self._release.append(lid)
            counts_due = (self._uses or self._latency) and now >= self._next_counts
            index_due = self._index_seq is not None and now >= self._next_index
            if not (self._release or counts_due or index_due or now >= self._next_renew):
                continue
            request = SyncRequest(
                holder=self.holder,
                providers=self._providers,
                models=self._models,
                terms=self._terms,
                held=[(lid, h.provider) for lid, h in self._held.items()],
                released=self._release,
                uses={m: dict(c) for m, c in self._uses.items()},
                latency=self._latency,
                routed=self._routed,
                index_seq=self._index_seq,
            )
            self._release, self._uses, self._latency, self._routed = [], {}, {}, []
            try:
                self.snapshot = await asyncio.wait_for(
                    self._link.get().sync.remote(request), CALL_TIMEOUT_S
                )
            except Exception as exc:
                self._link.lost(exc)
                self._restore(request)
                await asyncio.sleep(RETRY_S)
                continue
            self._catch_up(self.snapshot.index)
            self._next_renew = now + self._terms.lease_s / 3
            self._next_counts = now + COUNTS_S
            self._next_index = now + INDEX_S

    def _catch_up(self, delta: IndexDelta | None) -> None:
        """Other replicas' routed chains into the local index."""
        if delta is None or self._index_seq is None:
            return
        if delta.reset:
            self.index = PrefixIndex(self._terms.index_entries)
            delta.chains.extend(self._routed)  # routed while the sync was under way
        for provider, chain in delta.chains:
            self.index.add(provider, chain)
        self._index_seq = delta.seq

    def _restore(self, request: SyncRequest) -> None:
        """A sync that did not arrive: its releases, counts and chains go with the next one."""
        self._release = [*request.released, *self._release]
        self._routed = [*request.routed, *self._routed]
        for model, counts in request.uses.items():
            self._uses.setdefault(model, Counter()).update(counts)
        for provider, (total, count) in request.latency.items():
            now_total, now_count = self._latency.get(provider, (0.0, 0))
            self._latency[provider] = (now_total + total, now_count + count)

    async def stop(self) -> None:
        """Gives every slot back (a replica shutting down)."""
        if self._task is not None:
            self._task.cancel()
        ids = [*self._release, *self._held]
        if ids:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._link.get().release.remote(self.holder, ids), 2.0)
