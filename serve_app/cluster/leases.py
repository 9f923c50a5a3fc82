"""Provider state shared by every picker replica, kept by the broker actor: slot leases, host
pins, use counts and latency averages. Pure bookkeeping, with the time passed in.

A slot is a lease: it stays taken while its holder renews it and comes back `lease_s` after the
last renewal, so a replica that dies mid-request gives its slots back without telling anyone.
"""

from __future__ import annotations

import itertools
import secrets
from collections import Counter
from dataclasses import dataclass, field

from serve_app.routing.strategies import PinView


@dataclass
class Lease:
    id: str
    provider: str
    holder: str
    expires: float


class LeaseTable:
    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.busy: Counter[str] = Counter()
        # Lease ids stay unique across broker restarts (a replica renews by id).
        self._ids = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count())

    def _add(self, lease: Lease) -> None:
        self.leases[lease.id] = lease
        self.busy[lease.provider] += 1

    def grant(self, provider: str, holder: str, now: float, lease_s: float) -> Lease:
        lease = Lease(next(self._ids), provider, holder, now + lease_s)
        self._add(lease)
        return lease

    def release(self, holder: str, ids: list[str]) -> list[Lease]:
        """The holder's leases among `ids`, gone; another holder's are left alone."""
        gone = []
        for lease_id in ids:
            lease = self.leases.get(lease_id)
            if lease is not None and lease.holder == holder:
                gone.append(self._drop(lease_id))
        return gone

    def _drop(self, lease_id: str) -> Lease:
        lease = self.leases.pop(lease_id)
        self.busy[lease.provider] -= 1
        if self.busy[lease.provider] <= 0:
            del self.busy[lease.provider]
        return lease

    def renew(self, holder: str, held: list[tuple[str, str]], now: float, lease_s: float) -> None:
        """Extends the holder's leases. Ones this table does not know (it was restarted) are
        taken back in, even past capacity: their requests are running. A lease the holder no
        longer reports is left to its release or its expiry (a grant may be on its way)."""
        for lease_id, provider in held:
            lease = self.leases.get(lease_id)
            if lease is None:
                self._add(Lease(lease_id, provider, holder, now + lease_s))
            elif lease.holder == holder:
                lease.expires = now + lease_s

    def expire(self, now: float) -> list[Lease]:
        return [self._drop(lid) for lid, lease in list(self.leases.items()) if lease.expires <= now]

    def others(self, holder: str, providers: list[str]) -> dict[str, int]:
        """Slots of `providers` leased by anyone but `holder`."""
        out: Counter[str] = Counter()
        wanted = set(providers)
        for lease in self.leases.values():
            if lease.holder != holder and lease.provider in wanted:
                out[lease.provider] += 1
        return dict(out)


@dataclass
class Pin:
    model: str
    last_used: float


@dataclass
class Pins:
    """host -> the model it serves; a pin lapses `ttl` after its host's last use, unless a
    request still runs there."""

    pins: dict[str, Pin] = field(default_factory=dict)
    last_host: dict[str, str] = field(default_factory=dict)

    def touch(self, host: str, model: str, now: float) -> None:
        self.pins[host] = Pin(model, now)
        self.last_host[model] = host

    def refresh(self, host: str, now: float) -> None:
        pin = self.pins.get(host)
        if pin is not None:
            pin.last_used = now

    def lapse(self, now: float, ttl: dict[str, float], busy_hosts: set[str]) -> list[str]:
        """Drops pins idle past their model's ttl; returns their hosts."""
        gone = [
            host
            for host, pin in self.pins.items()
            if host not in busy_hosts and now - pin.last_used > ttl.get(pin.model, 0.0)
        ]
        for host in gone:
            model = self.pins.pop(host).model
            if self.last_host.get(model) == host:
                del self.last_host[model]
        return gone

    def view(self) -> PinView:
        return PinView(
            owner={h: p.model for h, p in self.pins.items()}, last_host=dict(self.last_host)
        )


@dataclass
class Latency:
    """Exponentially weighted moving average per provider, from batches of samples."""

    average: dict[str, float] = field(default_factory=dict)

    def add(self, provider: str, total_s: float, count: int, alpha: float) -> None:
        if count <= 0:
            return
        mean = total_s / count
        # A batch of n samples moves the average as n single samples of its mean would.
        keep = (1.0 - alpha) ** count
        old = self.average.get(provider)
        self.average[provider] = mean if old is None else keep * old + (1.0 - keep) * mean
