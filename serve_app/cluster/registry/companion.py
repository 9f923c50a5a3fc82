"""Actors that live beside the registry (the monitor, the broker): named after it, detached,
restarted when they die, and following its manifest."""

from __future__ import annotations

import asyncio

import aiohttp
from ray.actor import ActorClass, ActorHandle

from serve_app.cluster.follow import Follower
from serve_app.cluster.registry.actor import NAMESPACE, RegistryRef
from serve_app.cluster.registry.manifest import Manifest


def companion_handle(
    actor_class: ActorClass,
    registry: RegistryRef,
    role: str,
    on_head: bool = False,
    max_concurrency: int | None = None,
) -> ActorHandle:
    """The registry's `role` actor; created if there is none (it starts from the manifest).
    `on_head`: pinned to the head node, as the registry, for a file beside the registry's.
    `max_concurrency`: calls it runs at once (Ray's default for an async actor: 1000)."""
    return actor_class.options(
        name=f"{registry.name}-{role}",
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        num_cpus=0,
        resources={"node:__internal_head__": 0.001} if on_head else None,
        **({"max_concurrency": max_concurrency} if max_concurrency else {}),
    ).remote(registry, role)


class ManifestCompanion:
    """Base of those actors. The first call starts following the manifest (an actor's
    __init__ cannot await), then `_background()` runs for the actor's life; `_session` is
    theirs for upstream calls."""

    def __init__(self, registry: RegistryRef, role: str) -> None:
        self._registry = registry
        self._role = role
        self._session: aiohttp.ClientSession | None = None
        self._started: asyncio.Task[None] | None = None

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._run())
        if not self._started.done():
            await asyncio.shield(self._started)

    async def _run(self) -> None:
        self._session = aiohttp.ClientSession()
        follower = Follower(self._registry.handle, self._role, Manifest(), self._apply)
        await follower.start()
        asyncio.get_running_loop().create_task(self._background())

    def _apply(self, manifest: Manifest) -> None:
        raise NotImplementedError

    async def _background(self) -> None:
        raise NotImplementedError
