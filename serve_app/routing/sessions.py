"""Consistent hashing of sessions onto providers (pure).

Each provider owns VNODES points on a 64-bit ring; a session goes to the first provider at or
after its own point. Removing a provider (it failed, or left the config) moves only its
sessions, to the next provider on the ring, and they come back when it returns, as long as it
is still their first point. The hash is xxh3, the same in every process, so every router
replica sends a session to the same provider without sharing any state.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import xxhash

VNODES = 64


def point(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())


class Ring:
    def __init__(self, providers: Sequence[str]) -> None:
        points = sorted((point(f"{p}#{i}"), p) for p in providers for i in range(VNODES))
        self._points = [h for h, _ in points]
        self._owners = [p for _, p in points]
        self._count = len(set(providers))
        self._walks: dict[int, tuple[str, ...]] = {}  # start point -> its walk

    def walk(self, session: str) -> tuple[str, ...]:
        """Every provider once, in ring order from the session's point."""
        if not self._points:
            return ()
        start = bisect.bisect_left(self._points, point(session)) % len(self._points)
        walk = self._walks.get(start)
        if walk is None:
            walk = self._walks[start] = self._walk_from(start)
        return walk

    def _walk_from(self, start: int) -> tuple[str, ...]:
        n = len(self._points)
        seen: dict[str, None] = {}
        for i in range(n):
            seen.setdefault(self._owners[(start + i) % n])
            if len(seen) == self._count:
                break
        return tuple(seen)
