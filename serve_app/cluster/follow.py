"""Following a versioned state held by an actor (the registry's manifest, the monitor's health).

The actor side keeps a `Signal`; the replica side a `Follower`, which reads the current state
before the replica serves, then keeps one long-poll call outstanding: it returns at once when the
version moves, so a change reaches the replica in one actor round trip. While `busy` reports
something (requests on a retiring adapter version) it polls every half second, so the actor
learns promptly when that ends.

The actor implements `current(follower_id)`, `wait_for_change(follower_id, known_version, busy,
timeout_s)` (the state, or None after `timeout_s`) and `leave(follower_id)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ray.actor import ActorHandle

log = logging.getLogger("ray.serve")

LONG_POLL_S = 10.0
# A follower that has not called for this long is taken for gone (its replica died).
FOLLOWER_TTL_S = 30.0
BUSY_POLL_S = 0.5
RETRY_S = 0.5
# How long a call to the registry may take beyond its own long-poll before it counts as lost.
CALL_SLACK_S = 10.0


class Versioned(Protocol):
    @property
    def version(self) -> int: ...


S = TypeVar("S", bound=Versioned)


class Signal:
    """Wakes every waiter once per `fire`, without locks (one event loop)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


@dataclass
class Seen:
    """What an actor knows of one follower."""

    version: int  # the state's version it has applied
    busy: frozenset[str]  # what it reported busy with (requests on retiring adapter versions)
    last_seen: float
    waiting: int = 0  # its long-poll calls under way


class Followers:
    """The actor side's followers. A follower that leaves says so; one killed cannot: when it
    has no long-poll under way and has not called for `ttl_s` (a live one calls at least every
    LONG_POLL_S), it is taken for gone, so nobody waits for it to apply a version."""

    def __init__(self, ttl_s: float = FOLLOWER_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._seen: dict[str, Seen] = {}

    def seen(
        self, follower_id: str, version: int, busy: frozenset[str] = frozenset(), waiting: int = 0
    ) -> None:
        f = self._seen.get(follower_id)
        if f is None:
            f = self._seen[follower_id] = Seen(version, busy, time.monotonic())
        f.version, f.busy, f.last_seen = version, busy, time.monotonic()
        f.waiting += waiting

    def done_waiting(self, follower_id: str) -> None:
        f = self._seen.get(follower_id)
        if f is not None:
            f.waiting -= 1
            f.last_seen = time.monotonic()

    def leave(self, follower_id: str) -> None:
        self._seen.pop(follower_id, None)

    def live(self) -> dict[str, Seen]:
        cutoff = time.monotonic() - self._ttl_s
        for gone in [k for k, f in self._seen.items() if not f.waiting and f.last_seen < cutoff]:
            del self._seen[gone]
        return self._seen

    def versions(self) -> dict[str, int]:
        """Live follower id -> the version it has applied."""
        return {fid: f.version for fid, f in self.live().items()}


class ActorLink:
    """A handle that `connect` gets (creating the actor if it is gone), dropped after a failed
    call so that the next call connects again."""

    def __init__(self, connect: Callable[[], ActorHandle], caller: str, what: str) -> None:
        self._connect = connect
        self._caller = caller
        self._what = what
        self._handle: ActorHandle | None = None

    def get(self) -> ActorHandle:
        if self._handle is None:
            self._handle = self._connect()
        return self._handle

    def lost(self, exc: BaseException) -> None:
        log.warning(
            f"{self._what} call failed; retrying",
            extra={"caller": self._caller, "reason": type(exc).__name__},
        )
        self._handle = None


class Follower(Generic[S]):
    def __init__(
        self,
        connect: Callable[[], ActorHandle],
        follower_id: str,
        initial: S,
        apply: Callable[[S], None],
        busy: Callable[[S], list[str]] = lambda _: [],
    ) -> None:
        """`connect` returns the actor's handle, creating the actor if it is gone."""
        self.id = follower_id
        self._link = ActorLink(connect, follower_id, "follow")
        self._apply = apply
        self._busy = busy
        self._task: asyncio.Task[None] | None = None
        self.state = initial

    def actor(self) -> ActorHandle:
        return self._link.get()

    async def start(self) -> None:
        """Apply the current manifest (retrying until the registry answers), then follow it."""
        while True:
            try:
                state = await asyncio.wait_for(self.actor().current.remote(self.id), CALL_SLACK_S)
                break
            except Exception as exc:
                self._link.lost(exc)
                await asyncio.sleep(RETRY_S)
        self._set(state)
        self._task = asyncio.get_running_loop().create_task(self._follow())

    def _set(self, state: S) -> None:
        self._apply(state)
        self.state = state

    async def _follow(self) -> None:
        while True:
            busy = self._busy(self.state)
            timeout = BUSY_POLL_S if busy else LONG_POLL_S
            try:
                state = await asyncio.wait_for(
                    self.actor().wait_for_change.remote(self.id, self.state.version, busy, timeout),
                    timeout + CALL_SLACK_S,
                )
            except Exception as exc:
                self._link.lost(exc)
                await asyncio.sleep(RETRY_S)
                continue
            if state is not None:
                try:
                    self._set(state)
                except Exception:
                    # Keep serving the last good view: the actor validated this state, so this is
                    # a bug or an environment difference (a ${ENV} token unset on this node).
                    log.exception(
                        "could not apply followed state", extra={"version": state.version}
                    )
                    await asyncio.sleep(RETRY_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.actor().leave.remote(self.id), 2.0)
