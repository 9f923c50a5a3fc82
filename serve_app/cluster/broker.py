"""The broker actor: the one authoritative copy of the provider state that strategies share
across picker replicas on any node (what llm-router keeps in Redis).

Replicas take slots from it for first_available*, send it their use counts and latency samples
in batches, and read a snapshot back (serve_app/pickers/shared.py keeps that local, so most requests
never call here). It also keeps pinned Ollama models warm: a host pinned to a model gets a
load request shortly before the model's keep_alive would unload it, until the pin lapses.
One named, detached actor per registry (pins span model types: one host may serve several).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import aiohttp
import orjson
import ray
from ray.actor import ActorHandle

from serve_app.cluster.leases import Latency, LeaseTable, Pins
from serve_app.cluster.registry.actor import RegistryRef
from serve_app.cluster.registry.companion import ManifestCompanion, companion_handle
from serve_app.cluster.registry.manifest import Manifest, config_of
from serve_app.core.config import (
    ConfigError,
    ProviderConfig,
    RoutingConfig,
    StrategyName,
    duration_s,
)
from serve_app.routing.prefix import IndexDelta, IndexJournal
from serve_app.routing.strategies import PinView, slot_order
from serve_app.upstreams.base import json_headers, upstream_model
from serve_app.upstreams.ollama import ollama_root

log = logging.getLogger(__name__)

TICK_S = 0.2
# A replica that took or held slots this recently competes with the others for them.
ACTIVE_S = 5.0
WARM_TIMEOUT_S = 30.0
# Re-warm this long before keep_alive runs out (at most a fifth of it, for short keep_alives).
WARM_MARGIN_S = 60.0
# Prefix chains kept for replicas to catch up from; one further behind gets the whole index.
JOURNAL_CHAINS = 4096
PINNING = frozenset({"first_available_optim", "first_available_optim_nworkers"})


def broker_handle(registry: RegistryRef) -> ActorHandle:
    """The registry's broker; created if there is none (replicas then renew their leases
    into it)."""
    return companion_handle(Broker, registry, "broker")


class SlotSpec(NamedTuple):
    """What the broker needs of a provider to give out its slots."""

    id: str
    nworkers: int
    host_key: str


@dataclass(frozen=True)
class Terms:
    """A model type's routing values that the broker applies."""

    lease_s: float
    pin_ttl_s: float
    latency_alpha: float
    index_entries: int = RoutingConfig().prefix_index_entries

    @classmethod
    def of(cls, routing: RoutingConfig) -> Terms:
        return cls(
            routing.lease_s, routing.pin_ttl_s, routing.latency_alpha, routing.prefix_index_entries
        )


# What a replica or the broker goes by before it knows a model type's routing.
DEFAULT_TERMS = Terms.of(RoutingConfig())


@dataclass
class SyncRequest:
    holder: str
    providers: list[str]
    models: list[str]
    terms: Terms
    held: list[tuple[str, str]] = field(default_factory=list)  # (lease id, provider id)
    released: list[str] = field(default_factory=list)
    uses: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> provider -> n
    latency: dict[str, tuple[float, int]] = field(default_factory=dict)  # (sum s, n)
    # Text prefixes: chains routed since the last sync (provider, chain), and the index
    # sequence the replica has seen (None: it does not follow the index).
    routed: list[tuple[str, Sequence[int]]] = field(default_factory=list)
    index_seq: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """The shared state as one replica needs it: slots others hold, use counts of its models,
    latency averages, pins, and whether requests wait for slots (then nothing is kept idle)."""

    others: dict[str, int] = field(default_factory=dict)
    uses: dict[str, dict[str, int]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    pins: PinView = field(default_factory=PinView)
    contended: bool = False
    # No other replica took slots of these providers lately: keeping idle slots is harmless.
    alone: bool = True
    index: IndexDelta | None = None


@dataclass
class AcquireRequest:
    holder: str
    model: str
    strategy: StrategyName
    tiers: list[list[SlotSpec]]  # primaries, then sleeping providers
    wait_s: float
    terms: Terms
    providers: list[str]
    models: list[str]
    release: list[str] = field(default_factory=list)  # the holder's idle leases, given back


class Grant(NamedTuple):
    lease_id: str | None  # None: nothing came free within the wait
    provider: str | None
    snapshot: Snapshot


@dataclass
class _Waiter:
    request: AcquireRequest
    future: asyncio.Future[tuple[str, str]]


@ray.remote
class Broker(ManifestCompanion):
    def __init__(self, registry: RegistryRef, role: str) -> None:
        super().__init__(registry, role)
        self._leases = LeaseTable()
        self._pins = Pins()
        self._uses: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._latency = Latency()
        self._waiters: list[_Waiter] = []
        self._hosts: dict[str, str] = {}  # provider id -> host key
        self._active: dict[str, tuple[frozenset[str], float]] = {}  # holder -> providers, when
        self._pin_ttl: dict[str, float] = {}  # model -> pin ttl
        self._models: dict[str, list[ProviderConfig]] = {}  # for keep-alive
        self._warmed: dict[str, float] = {}
        self._warming: set[str] = set()
        self._warms: Counter[str] = Counter()
        self._index = IndexJournal(DEFAULT_TERMS.index_entries, JOURNAL_CHAINS)
        self._index_seen: dict[str, tuple[int, float]] = {}  # holder -> (seq, when)

    def _apply(self, manifest: Manifest) -> None:
        with contextlib.suppress(ConfigError):
            config = config_of(manifest)
            self._models = {
                name: [*m.providers, *m.providers_sleep]
                for group in config.model_types.values()
                for name, m in group.models.items()
            }
            self._index.index.keep_only(p.id for ps in self._models.values() for p in ps)

    # --- the replicas' calls -----------------------------------------------------------------

    async def sync(self, req: SyncRequest) -> Snapshot:
        await self._ensure_started()
        now = time.monotonic()
        if req.held or req.released:
            self._active[req.holder] = (frozenset(req.providers), now)
        changed = self._released(self._leases.release(req.holder, req.released), now)
        self._leases.renew(req.holder, req.held, now, req.terms.lease_s)
        for _, provider in req.held:
            self._refresh_pin(provider, now)
        for model, counts in req.uses.items():
            self._uses[model].update(counts)
        for provider, (total, count) in req.latency.items():
            self._latency.add(provider, total, count, req.terms.latency_alpha)
        if changed:
            self._serve_waiters(now)
        snapshot = self._snapshot(req.holder, req.providers, req.models)
        if req.routed:
            self._index.index.resize(req.terms.index_entries)
            self._index.add(req.holder, req.routed)
        if req.index_seq is None:
            return snapshot
        self._index_seen[req.holder] = (self._index.seq, now)
        return replace(snapshot, index=self._index.delta(req.holder, req.index_seq))

    async def acquire(self, req: AcquireRequest) -> Grant:
        """A slot on the best free provider of the request's tiers, waiting up to `wait_s`
        behind earlier waiters when none is free."""
        await self._ensure_started()
        now = time.monotonic()
        self._active[req.holder] = (frozenset(req.providers), now)
        self._pin_ttl[req.model] = req.terms.pin_ttl_s
        for tier in req.tiers:
            for spec in tier:
                self._hosts[spec.id] = spec.host_key
        if self._released(self._leases.release(req.holder, req.release), now):
            self._serve_waiters(now)
        # A slot free now is one no earlier waiter can use (each release serves them first), so
        # taking it keeps first come, first served.
        granted = self._try_grant(req, now)
        if granted is None:
            waiter = _Waiter(req, asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
            try:
                granted = await asyncio.wait_for(asyncio.shield(waiter.future), req.wait_s)
            except TimeoutError:
                if waiter.future.done() and not waiter.future.cancelled():
                    granted = waiter.future.result()  # granted just as the wait ran out
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        lease_id, provider = granted if granted else (None, None)
        return Grant(lease_id, provider, self._snapshot(req.holder, req.providers, req.models))

    async def release(self, holder: str, lease_ids: list[str]) -> None:
        now = time.monotonic()
        if self._released(self._leases.release(holder, lease_ids), now):
            self._serve_waiters(now)

    async def state(self) -> dict[str, object]:
        """For operators and tests: slots taken per provider and by whom, pins, waiters, warms."""
        await self._ensure_started()
        holders: defaultdict[str, list[str]] = defaultdict(list)
        for lease in self._leases.leases.values():
            holders[lease.provider].append(lease.holder)
        return {
            "busy": dict(self._leases.busy),
            "holders": dict(holders),
            "pins": {h: p.model for h, p in self._pins.pins.items()},
            "waiters": len(self._waiters),
            "uses": {m: dict(c) for m, c in self._uses.items()},
            "latency": dict(self._latency.average),
            "warms": dict(self._warms),
            "prefix_index": {
                "entries": self._index.index.sizes(),
                "seq": self._index.seq,
                "followers": {h: seq for h, (seq, _) in self._index_seen.items()},
                "routed_by": dict(self._index.added),
            },
        }

    # --- bookkeeping -------------------------------------------------------------------------

    def _snapshot(self, holder: str, providers: list[str], models: list[str]) -> Snapshot:
        return Snapshot(
            others=self._leases.others(holder, providers),
            uses={m: dict(self._uses[m]) for m in models if m in self._uses},
            latency={p: self._latency.average[p] for p in providers if p in self._latency.average},
            pins=self._pins.view(),
            contended=self._contended(providers),
            alone=self._alone(holder, providers),
        )

    def _contended(self, providers: list[str]) -> bool:
        """Whether a request waits for a slot on any of these providers."""
        mine = set(providers)
        return any(
            spec.id in mine for w in self._waiters for tier in w.request.tiers for spec in tier
        )

    def _alone(self, holder: str, providers: list[str]) -> bool:
        since = time.monotonic() - ACTIVE_S
        mine = set(providers)
        return not any(
            other != holder and at > since and not mine.isdisjoint(theirs)
            for other, (theirs, at) in self._active.items()
        )

    def _refresh_pin(self, provider: str, now: float) -> None:
        host = self._hosts.get(provider)
        if host is not None:
            self._pins.refresh(host, now)

    def _released(self, leases: list, now: float) -> bool:
        for lease in leases:
            self._refresh_pin(lease.provider, now)
        return bool(leases)

    def _try_grant(self, req: AcquireRequest, now: float) -> tuple[str, str] | None:
        pins = self._pins.view()
        for tier in req.tiers:
            order = slot_order(req.strategy, req.model, tier, self._leases.busy, pins)
            if order:
                spec = order[0]
                lease = self._leases.grant(spec.id, req.holder, now, req.terms.lease_s)
                if req.strategy in PINNING:
                    self._pins.touch(spec.host_key, req.model, now)
                return lease.id, spec.id
        return None

    def _serve_waiters(self, now: float) -> None:
        """First come, first served: each waiter, in order, takes a slot if one fits it."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            granted = self._try_grant(waiter.request, now)
            if granted is not None:
                waiter.future.set_result(granted)
                self._waiters.remove(waiter)

    async def _background(self) -> None:
        """Expires leases, lapses pins, serves waiters they free, and keeps pins warm."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            expired = self._leases.expire(now)
            for holder in [h for h, (_, at) in self._active.items() if at < now - ACTIVE_S]:
                del self._active[holder]
            for holder in [h for h, (_, at) in self._index_seen.items() if at < now - ACTIVE_S]:
                del self._index_seen[holder]
            for lease in expired:
                log.warning(
                    "slot lease expired",
                    extra={"provider": lease.provider, "holder": lease.holder},
                )
            busy_hosts = {self._hosts.get(p, "") for p in self._leases.busy}
            lapsed = self._pins.lapse(now, self._pin_ttl, busy_hosts)
            if expired or lapsed:
                self._serve_waiters(now)
            self._keep_warm(now, busy_hosts)

    def _keep_warm(self, now: float, busy_hosts: set[str]) -> None:
        for host, pin in self._pins.pins.items():
            if host in busy_hosts:
                continue  # a request is running there: it keeps the model loaded
            for p in self._models.get(pin.model, []):
                if p.host_key != host or p.api_type != "ollama" or p.keep_alive is None:
                    continue
                keep = duration_s(p.keep_alive)
                if keep <= 0 or p.id in self._warming:
                    continue
                last = max(pin.last_used, self._warmed.get(p.id, 0.0))
                if now >= last + keep - min(WARM_MARGIN_S, keep / 5):
                    self._warming.add(p.id)
                    asyncio.get_running_loop().create_task(self._warm(p, pin.model))

    async def _warm(self, provider: ProviderConfig, model: str) -> None:
        """Ollama loads a model (and restarts its keep_alive) on a generate without prompt."""
        assert self._session is not None
        body = {
            "model": upstream_model(provider, model),
            "keep_alive": provider.keep_alive,
            "stream": False,
        }
        try:
            async with self._session.post(
                f"{ollama_root(provider)}/api/generate",
                data=orjson.dumps(body),
                headers=json_headers(provider),
                timeout=aiohttp.ClientTimeout(total=WARM_TIMEOUT_S),
            ) as resp:
                await resp.read()
                ok = resp.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok = False
            log.warning(
                "keep-alive warm failed",
                extra={"provider": provider.id, "reason": type(exc).__name__},
            )
        finally:
            self._warming.discard(provider.id)
        self._warmed[provider.id] = time.monotonic()
        if ok:
            self._warms[provider.id] += 1
