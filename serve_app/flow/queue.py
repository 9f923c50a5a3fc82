"""A bounded queue that orders waiting requests by priority (strict between priorities), then
fair share between tenants inside a priority (weighted round-robin: stride scheduling, each
tenant's turn comes 1/weight later after each of its requests goes), then arrival. Full, it
sheds the lowest priority's newest waiter first (the newcomer itself when nothing waiting is
of a lower priority). Pure: no Ray, no clock."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
# Where a priority's metric label range starts (by size; the negatives mirror them): a client
# allowed `x-priority` cannot mint one series per value.
PRIORITY_BOUNDS = (1, 10, 100)
MAX_PRIORITY = 1000


def priority_label(priority: int) -> str:
    """A priority's metric label: "0", or its range ("1..9", "10..99", "100..1000" and the
    same below 0), one of 7 values."""
    if priority == 0:
        return "0"
    size = abs(priority)
    low = max(b for b in PRIORITY_BOUNDS if b <= size)
    high = next((b - 1 for b in PRIORITY_BOUNDS if b > size), MAX_PRIORITY)
    return f"{low}..{high}" if priority > 0 else f"-{high}..-{low}"


@dataclass(eq=False)
class Waiter(Generic[T]):
    item: T
    priority: int
    tenant: str
    weight: float
    size: int
    seq: int = 0  # arrival order


@dataclass
class _Band(Generic[T]):
    """One priority: its tenants' waiters in arrival order, and their place in the rotation."""

    tenants: dict[str, deque[Waiter[T]]] = field(default_factory=dict)
    passes: dict[str, float] = field(default_factory=dict)  # a tenant's next turn
    clock: float = 0.0  # the turn of the last waiter that went

    def next_tenant(self) -> str:
        return min(self.tenants, key=lambda t: (self.passes[t], self.tenants[t][0].seq))


class FairQueue(Generic[T]):
    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self._bands: dict[int, _Band[T]] = {}
        self._seq = 0
        self.count = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self.count

    def by_priority(self) -> dict[int, int]:
        return {
            p: sum(len(q) for q in band.tenants.values())
            for p, band in self._bands.items()
            if band.tenants
        }

    def push(self, waiter: Waiter[T]) -> list[Waiter[T]]:
        """Adds `waiter`; the waiters shed to make room (`waiter` itself when it cannot fit:
        larger than the queue, or not enough waiting of a lower priority)."""
        count, size, shed = self.count + 1, self.bytes + waiter.size, []
        if count > self.max_count or size > self.max_bytes:
            for victim in self._lower_newest_first(waiter.priority):
                shed.append(victim)
                count, size = count - 1, size - victim.size
                if count <= self.max_count and size <= self.max_bytes:
                    break
            else:
                return [waiter]
        for victim in shed:
            self.remove(victim)
        self._seq += 1
        waiter.seq = self._seq
        band = self._bands.setdefault(waiter.priority, _Band())
        if waiter.tenant not in band.tenants:
            band.tenants[waiter.tenant] = deque()
            # A tenant that was idle starts at the rotation's present: no banked turns.
            band.passes[waiter.tenant] = max(band.passes.get(waiter.tenant, 0.0), band.clock)
        band.tenants[waiter.tenant].append(waiter)
        self.count += 1
        self.bytes += waiter.size
        return shed

    def peek(self) -> Waiter[T] | None:
        """The waiter that goes next."""
        band = self._top()
        return None if band is None else band.tenants[band.next_tenant()][0]

    def pop(self) -> Waiter[T] | None:
        band = self._top()
        if band is None:
            return None
        tenant = band.next_tenant()
        waiter = band.tenants[tenant][0]
        band.clock = band.passes[tenant]
        band.passes[tenant] += 1.0 / waiter.weight
        self._take(band, waiter)
        return waiter

    def remove(self, waiter: Waiter[T]) -> bool:
        """Takes out a waiter that leaves (its client left, its time ran out, it was shed)."""
        band = self._bands.get(waiter.priority)
        queue = None if band is None else band.tenants.get(waiter.tenant)
        if band is None or queue is None or waiter not in queue:
            return False
        self._take(band, waiter)
        return True

    def _take(self, band: _Band[T], waiter: Waiter[T]) -> None:
        queue = band.tenants[waiter.tenant]
        queue.remove(waiter)
        if not queue:
            del band.tenants[waiter.tenant]
        self.count -= 1
        self.bytes -= waiter.size

    def _top(self) -> _Band[T] | None:
        live = [p for p, band in self._bands.items() if band.tenants]
        return self._bands[max(live)] if live else None

    def _lower_newest_first(self, priority: int) -> list[Waiter[T]]:
        """The waiters below `priority`: the lowest priority first, its newest first."""
        waiting = [
            w
            for p, band in self._bands.items()
            if p < priority
            for queue in band.tenants.values()
            for w in queue
        ]
        return sorted(waiting, key=lambda w: (w.priority, -w.seq))
