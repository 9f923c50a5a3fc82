"""A replica's side of the registry: read the manifest before serving, then follow it.

One long-poll call is outstanding at a time; it returns at once when the manifest changes, so a
change reaches the replica in one actor round trip. While the replica still has requests on a
retiring adapter version it polls every half second, so the registry learns promptly when the
old version can be unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ray.actor import ActorHandle

from serve_app.registry.actor import RegistryRef
from serve_app.registry.manifest import Manifest

log = logging.getLogger("ray.serve")

LONG_POLL_S = 10.0
BUSY_POLL_S = 0.5
RETRY_S = 0.5
# How long a call to the registry may take beyond its own long-poll before it counts as lost.
CALL_SLACK_S = 10.0


class Follower:
    def __init__(
        self,
        ref: RegistryRef,
        follower_id: str,
        apply: Callable[[Manifest], None],
        busy: Callable[[Manifest], list[str]] = lambda _: [],
    ) -> None:
        self.id = follower_id
        self._ref = ref
        self._apply = apply
        self._busy = busy
        self._handle: ActorHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.manifest = Manifest()

    def registry(self) -> ActorHandle:
        if self._handle is None:
            self._handle = self._ref.handle()
        return self._handle

    async def start(self) -> None:
        """Apply the current manifest (retrying until the registry answers), then follow it."""
        while True:
            try:
                manifest = await asyncio.wait_for(
                    self.registry().get_manifest.remote(self.id), CALL_SLACK_S
                )
                break
            except Exception as exc:
                self._lost(exc)
                await asyncio.sleep(RETRY_S)
        self._set(manifest)
        self._task = asyncio.get_running_loop().create_task(self._follow())

    def _set(self, manifest: Manifest) -> None:
        self._apply(manifest)
        self.manifest = manifest

    def _lost(self, exc: BaseException) -> None:
        log.warning(
            "registry call failed; retrying",
            extra={"follower": self.id, "reason": type(exc).__name__},
        )
        self._handle = None

    async def _follow(self) -> None:
        while True:
            busy = self._busy(self.manifest)
            timeout = BUSY_POLL_S if busy else LONG_POLL_S
            try:
                manifest = await asyncio.wait_for(
                    self.registry().wait_for_change.remote(
                        self.id, self.manifest.version, busy, timeout
                    ),
                    timeout + CALL_SLACK_S,
                )
            except Exception as exc:
                self._lost(exc)
                await asyncio.sleep(RETRY_S)
                continue
            if manifest is not None:
                try:
                    self._set(manifest)
                except Exception:
                    # Keep serving the last good view; the registry validated this manifest, so
                    # this is a bug or an environment difference (a missing ${ENV} token).
                    log.exception("could not apply manifest", extra={"version": manifest.version})
                    await asyncio.sleep(RETRY_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.registry().leave.remote(self.id), 2.0)
