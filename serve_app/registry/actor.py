"""The registry actor: one named, detached Ray actor that owns the manifest.

Every change is written to disk before it is acknowledged, and bumps the manifest version;
replicas follow by long-poll (`wait_for_change` returns when the version moves past theirs) and,
in each poll, report the version they have applied and the retiring adapter versions they still
have requests on. That report is what lets an adapter switch be acknowledged only once every
replica routes to the new version, and an old version be unloaded only once nothing uses it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import aiohttp
import orjson
import ray
from pydantic import BaseModel, ConfigDict
from ray.actor import ActorHandle

from serve_app.config import ConfigError
from serve_app.errors import RouterError
from serve_app.follow import Signal
from serve_app.registry import lora, store
from serve_app.registry.manifest import (
    AdapterRegistration,
    Manifest,
    WeightsUpdate,
    adapter_report,
    check_registration,
    config_of,
    lora_name,
    providers_by_id,
    with_config,
    with_new_version,
    with_profiles,
    with_unloaded,
    with_weights,
)

log = logging.getLogger(__name__)

NAMESPACE = "serve-router"
DEFAULT_NAME = "llm-router-registry"
PATH_ENV = "LLM_ADAPTER_REGISTRY_PATH"
DEFAULT_PATH = "state/registry.json"
# A follower that has not called for this long is taken for gone (its replica died).
FOLLOWER_TTL_S = 30.0
# After this long an old adapter version is unloaded even if a replica still reports a request
# on it (a stream that never ends must not pin GPU memory forever).
DRAIN_TIMEOUT_S = 600.0
UNLOAD_RETRY_S = 10.0


class Answer(NamedTuple):
    """An admin call's HTTP answer, made in the actor and relayed as is by the ingress."""

    status: int
    body: bytes

    @classmethod
    def error(cls, err: RouterError) -> Answer:
        return cls(err.status, err.body())


class Published(NamedTuple):
    version: int
    changed: bool
    problems: list[tuple[str, str]]

    def checked(self, source: str, kind: str = "models config") -> Published:
        """Itself, or the ConfigError its problems make (as at start)."""
        if self.problems:
            raise ConfigError(source, self.problems, kind)
        return self


class RegistryRef(BaseModel):
    """How a replica finds the registry (and re-creates it from its file if it is gone)."""

    model_config = ConfigDict(frozen=True)

    name: str = DEFAULT_NAME
    path: str

    @classmethod
    def resolve(cls, name: str | None = None, path: str | None = None) -> RegistryRef:
        """Name and absolute path: the arguments, else $LLM_ADAPTER_REGISTRY_PATH, else default."""
        file = Path(path or os.environ.get(PATH_ENV) or DEFAULT_PATH)
        return cls(name=name or DEFAULT_NAME, path=str(file.resolve()))

    def handle(self) -> ActorHandle:
        """The running registry; created if there is none, loading the manifest from its file.

        It is pinned to the head node so that the path always means the same disk.
        """
        return Registry.options(
            name=self.name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            max_restarts=-1,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
        ).remote(self.path)


@dataclass
class _Follower:
    version: int
    busy: frozenset[str]
    last_seen: float
    waiting: int = 0


@ray.remote
class Registry:
    def __init__(self, path: str) -> None:
        self._path = Path(path)
        data = store.load(self._path)
        self._manifest = Manifest.model_validate_json(data) if data else Manifest()
        self._changed = Signal()
        self._reported = Signal()
        self._followers: dict[str, _Follower] = {}
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._retire_task: asyncio.Task[None] | None = None
        self._retiring_since: dict[str, float] = {}
        self._next_unload: dict[str, float] = {}
        log.info("registry ready", extra={"path": str(self._path), "version": self.version})

    @property
    def version(self) -> int:
        return self._manifest.version

    def _commit(self, manifest: Manifest) -> None:
        """Persist, then publish: nothing is acknowledged before it is on disk."""
        store.save(self._path, manifest.model_dump_json().encode())
        self._manifest = manifest
        self._changed.fire()
        log.info("manifest published", extra={"version": manifest.version})

    def _seen(self, follower_id: str, version: int, busy: frozenset[str], waiting: int) -> None:
        f = self._followers.get(follower_id)
        if f is None:
            f = self._followers[follower_id] = _Follower(version, busy, time.monotonic())
        f.version, f.busy, f.last_seen = version, busy, time.monotonic()
        f.waiting += waiting
        self._reported.fire()

    def _live(self) -> dict[str, _Follower]:
        cutoff = time.monotonic() - FOLLOWER_TTL_S
        for fid in [
            k for k, f in self._followers.items() if not f.waiting and f.last_seen < cutoff
        ]:
            del self._followers[fid]
        return self._followers

    def _start_background(self) -> None:
        if self._retire_task is None or self._retire_task.done():
            self._retire_task = asyncio.get_running_loop().create_task(self._retire_loop())

    # --- followers ---------------------------------------------------------------------------

    async def current(self, follower_id: str | None = None) -> Manifest:
        """The current manifest; a replica calls it before it takes traffic."""
        self._start_background()
        if follower_id is not None:
            self._seen(follower_id, self.version, frozenset(), 0)
        return self._manifest

    async def wait_for_change(
        self, follower_id: str, known_version: int, busy: list[str], timeout_s: float
    ) -> Manifest | None:
        """The manifest once its version differs from `known_version`; None after `timeout_s`."""
        self._start_background()
        self._seen(follower_id, known_version, frozenset(busy), 1)
        try:
            if self.version == known_version:
                await self._changed.wait(timeout_s)
        finally:
            self._followers.get(follower_id, _Follower(0, frozenset(), 0)).waiting -= 1
        return None if self.version == known_version else self._manifest

    async def leave(self, follower_id: str) -> None:
        self._followers.pop(follower_id, None)
        self._reported.fire()

    async def followers(self) -> dict[str, int]:
        """Live follower id -> the manifest version it has applied."""
        return {fid: f.version for fid, f in self._live().items()}

    async def wait_for_followers(self, version: int, timeout_s: float) -> list[str]:
        """Wait until every live follower has applied `version`; the ones that had not, if any."""
        deadline = time.monotonic() + timeout_s
        while True:
            behind = sorted(k for k, f in self._live().items() if f.version < version)
            left = deadline - time.monotonic()
            if not behind or left <= 0:
                return behind
            await self._reported.wait(min(left, 1.0))

    # --- models config -----------------------------------------------------------------------

    async def _publish(self, change: Callable[[Manifest], Manifest]) -> Published:
        async with self._lock:
            try:
                manifest = change(self._manifest)
            except ConfigError as exc:
                return Published(self.version, False, exc.problems)
            changed = manifest is not self._manifest
            if changed:
                self._commit(manifest)
        return Published(manifest.version, changed, [])

    async def publish_config(self, raw: object, source: str) -> Published:
        """Validate and publish a models config; problems come back as values, nothing changes."""
        return await self._publish(lambda m: with_config(m, raw, source))

    async def publish_weights(self, update: WeightsUpdate) -> Published:
        """New weights for some providers of one model, written into the models config."""
        return await self._publish(lambda m: with_weights(m, update))

    async def publish_profiles(self, raw: object, source: str, active: str) -> Published:
        """Validate and publish the model profiles and the active profile's name."""
        return await self._publish(lambda m: with_profiles(m, raw, source, active))

    # --- adapters ----------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def register_adapter(self, req: AdapterRegistration, ack_timeout_s: float) -> Answer:
        """Load the new version on every vLLM provider of the base model, publish, wait for acks.

        The answer comes once every live replica routes the adapter to the new version (or after
        `ack_timeout_s`, naming the replicas that had not confirmed).
        """
        self._start_background()
        async with self._lock:
            try:
                targets = check_registration(self._manifest, req)
            except RouterError as err:
                return Answer.error(err)
            except ConfigError:
                return Answer.error(
                    RouterError(409, "no models config is published yet", code="no_config")
                )
            existing = self._manifest.adapters.get(req.name)
            number = existing.current.version + 1 if existing else 1
            name = lora_name(req.name, number)
            reasons = await asyncio.gather(
                *(lora.load(self._http(), p, name, req.source) for p in targets)
            )
            rows = [
                {"provider": p.id, "status": "loaded"}
                if why is None
                else {"provider": p.id, "status": "failed", "detail": why}
                for p, why in zip(targets, reasons, strict=True)
            ]
            loaded = [p.id for p, why in zip(targets, reasons, strict=True) if why is None]
            if not loaded:
                detail = "; ".join(f"{r['provider']}: {r['detail']}" for r in rows)
                err = RouterError(
                    502,
                    f"no vLLM provider of {req.base_model!r} loaded the adapter ({detail})",
                    type="api_error",
                    code="adapter_load_failed",
                )
                return Answer.error(err)
            manifest = with_new_version(self._manifest, req, loaded, time.time())
            self._commit(manifest)
        log.info(
            "adapter version published",
            extra={"adapter": req.name, "adapter_version": number, "loaded_on": len(loaded)},
        )
        unconfirmed = await self.wait_for_followers(manifest.version, ack_timeout_s)
        body = {
            "name": req.name,
            "base_model": req.base_model,
            "version": number,
            "lora_name": name,
            "manifest_version": manifest.version,
            "providers": rows,
            "unconfirmed_replicas": unconfirmed,
        }
        return Answer(201, orjson.dumps(body))

    async def adapters(self) -> Answer:
        return Answer(
            200, orjson.dumps({"version": self.version, "data": adapter_report(self._manifest)})
        )

    def _drained(self, retired_in: int, name: str) -> bool:
        return all(f.version >= retired_in and name not in f.busy for f in self._live().values())

    async def _retire_loop(self) -> None:
        while True:
            try:
                await self._unload_drained()
            except Exception:
                log.exception("unloading retired adapter versions failed")
            await self._reported.wait(1.0)

    async def _unload_drained(self) -> None:
        now = time.monotonic()
        for adapter_name, adapter in self._manifest.adapters.items():
            for old in adapter.retiring:
                name = lora_name(adapter_name, old.version)
                since = self._retiring_since.setdefault(name, now)
                if self._next_unload.get(name, 0.0) > now:
                    continue
                assert old.retired_in is not None
                if not self._drained(old.retired_in, name) and now - since < DRAIN_TIMEOUT_S:
                    continue
                await self._unload(adapter_name, old.version, old.loaded)

    async def _unload(self, adapter_name: str, number: int, loaded: tuple[str, ...]) -> None:
        name = lora_name(adapter_name, number)
        providers = providers_by_id(config_of(self._manifest))
        # A provider no longer in the config is not ours to call any more.
        gone = {pid for pid in loaded if pid not in providers}
        present = [providers[pid] for pid in loaded if pid in providers]
        reasons = await asyncio.gather(*(lora.unload(self._http(), p, name) for p in present))
        done = gone | {p.id for p, why in zip(present, reasons, strict=True) if why is None}
        for p, why in zip(present, reasons, strict=True):
            if why is not None:
                log.warning("adapter unload failed", extra={"provider": p.id, "reason": why})
        if len(done) < len(loaded):
            self._next_unload[name] = time.monotonic() + UNLOAD_RETRY_S
        if done:
            async with self._lock:
                self._commit(with_unloaded(self._manifest, adapter_name, number, done))
            log.info("adapter version unloaded", extra={"adapter": name, "providers": len(done)})
