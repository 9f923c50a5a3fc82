"""Consistent hashing of sessions onto providers (pure).

Each provider owns VNODES points on a 64-bit ring; a session goes to the first provider at or
after its own point. Removing a provider (it failed, or left the config) moves only its
sessions, to the next provider on the ring, and they come back when it returns, as long as it
is still their first point. The hash is xxh3, the same in every process, so every router
replica sends a session to the same provider without sharing any state.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

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

    def walk(self, session: str) -> Iterator[str]:
        """Every provider once, in ring order from the session's point."""
        n = len(self._points)
        if not n:
            return
        start = bisect.bisect_left(self._points, point(session))
        seen: set[str] = set()
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self._count:
                    return
