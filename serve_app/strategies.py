"""Provider-choice strategies: pure functions of the candidates and their load.

Each returns the full try order (its first choice, then the fallbacks), so failover follows
the same policy as the first pick. Stateful strategies (round-robin) keep one object per model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from serve_app.config import ProviderConfig, StrategyName

InFlight = Callable[[str], int]


class Strategy(Protocol):
    def order(
        self, candidates: Sequence[ProviderConfig], in_flight: InFlight
    ) -> list[ProviderConfig]:
        """Candidates in the order they should be tried."""


class WeightedRandom:
    """Weighted sampling without replacement (Efraimidis-Spirakis): P(first) = w / sum(w)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def order(
        self, candidates: Sequence[ProviderConfig], in_flight: InFlight
    ) -> list[ProviderConfig]:
        if len(candidates) < 2:
            return list(candidates)
        keyed = []
        for p in candidates:
            u = self._rng.random() or 1e-12
            keyed.append((u ** (1.0 / p.weight) if p.weight > 0 else -1.0 + u, p))
        keyed.sort(key=lambda kp: kp[0], reverse=True)
        return [p for _, p in keyed]


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def order(
        self, candidates: Sequence[ProviderConfig], in_flight: InFlight
    ) -> list[ProviderConfig]:
        if not candidates:
            return []
        start = self._next % len(candidates)
        self._next += 1
        return [*candidates[start:], *candidates[:start]]


class LeastInFlight:
    """Power of two choices: the less loaded of two random candidates, then the rest by load."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def order(
        self, candidates: Sequence[ProviderConfig], in_flight: InFlight
    ) -> list[ProviderConfig]:
        if len(candidates) < 2:
            return list(candidates)
        a, b = self._rng.sample(range(len(candidates)), 2)
        first = (
            candidates[a]
            if in_flight(candidates[a].id) <= in_flight(candidates[b].id)
            else candidates[b]
        )
        rest = sorted((p for p in candidates if p is not first), key=lambda p: in_flight(p.id))
        return [first, *rest]


class FirstAvailable:
    """Config order, idle providers first: the first free one serves."""

    def order(
        self, candidates: Sequence[ProviderConfig], in_flight: InFlight
    ) -> list[ProviderConfig]:
        return sorted(candidates, key=lambda p: in_flight(p.id) > 0)


def make_strategy(name: StrategyName, rng: random.Random | None = None) -> Strategy:
    rng = rng or random.Random()
    if name == "weighted_random":
        return WeightedRandom(rng)
    if name == "round_robin":
        return RoundRobin()
    if name == "least_in_flight":
        return LeastInFlight(rng)
    if name == "first_available":
        return FirstAvailable()
    raise ValueError(f"unknown strategy {name!r}")
