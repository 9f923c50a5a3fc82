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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import aiohttp
import orjson
import ray
from pydantic import BaseModel, ConfigDict
from ray.actor import ActorHandle

from serve_app.access.keys import KeyLimits, new_key
from serve_app.cluster.follow import Followers, Signal
from serve_app.cluster.registry import lora, store
from serve_app.cluster.registry.adapters import (
    AdapterRegistration,
    adapter_report,
    check_registration,
    loads_due,
    next_number,
    watched,
    with_listings,
    with_loaded,
    with_new_version,
    with_unloaded,
    without_adapter,
)
from serve_app.cluster.registry.manifest import (
    Manifest,
    WeightsUpdate,
    config_of,
    lora_name,
    providers_by_id,
    with_config,
    with_key,
    with_profiles,
    with_weights,
    without_key,
)
from serve_app.core.config import ConfigError
from serve_app.core.errors import RouterError, key_not_found

log = logging.getLogger(__name__)

NAMESPACE = "serve-router"
DEFAULT_NAME = "llm-router-registry"
PATH_ENV = "LLM_ADAPTER_REGISTRY_PATH"
DEFAULT_PATH = "state/registry.json"
# After this long an old adapter version is unloaded even if a replica still reports a request
# on it (a stream that never ends must not pin GPU memory forever).
DRAIN_TIMEOUT_S = 600.0
# A failed load or unload is tried again after this long.
LORA_RETRY_S = 5.0
# How often the vLLM servers' listings are compared with the manifest: a restarted server gets
# its adapters back within about this long of answering again.
RECONCILE_S = 1.0


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


@ray.remote
class Registry:
    def __init__(self, path: str) -> None:
        self._path = Path(path)
        data = store.load(self._path)
        self._manifest = Manifest.model_validate_json(data) if data else Manifest()
        self._changed = Signal()
        self._reported = Signal()
        self._followers = Followers()
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._background: list[asyncio.Task[None]] = []
        self._retiring_since: dict[str, float] = {}
        self._next_try: dict[tuple[str, str], float] = {}  # (lora name, provider id) -> when
        log.info("registry ready", extra={"path": str(self._path), "version": self.version})

    @property
    def version(self) -> int:
        return self._manifest.version

    def _commit(self, manifest: Manifest) -> bool:
        """Persist, then publish: nothing is acknowledged before it is on disk. False (and
        nothing done) when the manifest is the current one."""
        if manifest is self._manifest:
            return False
        store.save(self._path, manifest.model_dump_json().encode())
        self._manifest = manifest
        self._changed.fire()
        log.info("manifest published", extra={"version": manifest.version})
        return True

    def _seen(self, follower_id: str, version: int, busy: frozenset[str], waiting: int) -> None:
        self._followers.seen(follower_id, version, busy, waiting)
        self._reported.fire()

    def _start_background(self) -> None:
        if not self._background:
            loop = asyncio.get_running_loop()
            self._background = [
                loop.create_task(self._every(self._unload_drained, self._reported.wait, 1.0)),
                loop.create_task(self._every(self._reconcile, asyncio.sleep, RECONCILE_S)),
            ]

    @staticmethod
    async def _every(
        step: Callable[[], Awaitable[None]],
        pause: Callable[[float], Awaitable[None]],
        period: float,
    ) -> None:
        while True:
            try:
                await step()
            except Exception:
                log.exception("adapter background step failed", extra={"step": step.__name__})
            await pause(period)

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
            self._followers.done_waiting(follower_id)
        return None if self.version == known_version else self._manifest

    async def leave(self, follower_id: str) -> None:
        self._followers.leave(follower_id)
        self._reported.fire()

    async def followers(self) -> dict[str, int]:
        """Live follower id -> the manifest version it has applied."""
        return self._followers.versions()

    async def wait_for_followers(self, version: int, timeout_s: float) -> list[str]:
        """Wait until every live follower has applied `version`; the ones that had not, if any."""
        deadline = time.monotonic() + timeout_s
        while True:
            behind = sorted(k for k, v in self._followers.versions().items() if v < version)
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
            changed = self._commit(manifest)
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

    # --- client keys -------------------------------------------------------------------------

    async def create_key(self, limits: KeyLimits, ack_timeout_s: float) -> Answer:
        """A new client key: its record joins the manifest (the answer comes once every live
        replica knows it); the key itself is in this answer only (never stored, never logged)."""
        async with self._lock:
            record, key = new_key(limits, time.time())
            manifest = with_key(self._manifest, record)
            self._commit(manifest)
        log.info("client key created", extra={"key_id": record.id, "key_name": record.name})
        unconfirmed = await self.wait_for_followers(manifest.version, ack_timeout_s)
        body = record.public() | {"key": key, "unconfirmed_replicas": unconfirmed}
        return Answer(201, orjson.dumps(body))

    async def update_key(self, key_id: str, limits: KeyLimits, ack_timeout_s: float) -> Answer:
        """New limits for a key (the same secret): the answer comes once every live replica
        applies them."""
        async with self._lock:
            record = self._manifest.keys.get(key_id)
            if record is None:
                return Answer.error(key_not_found(key_id))
            record = record.model_copy(update=limits.model_dump())
            manifest = with_key(self._manifest, record)
            self._commit(manifest)
        log.info("client key updated", extra={"key_id": key_id, "key_name": record.name})
        unconfirmed = await self.wait_for_followers(manifest.version, ack_timeout_s)
        return Answer(200, orjson.dumps(record.public() | {"unconfirmed_replicas": unconfirmed}))

    async def delete_key(self, key_id: str, ack_timeout_s: float) -> Answer:
        """Revoke a key: the answer comes once every live replica refuses it."""
        async with self._lock:
            if key_id not in self._manifest.keys:
                return Answer.error(key_not_found(key_id))
            manifest = without_key(self._manifest, key_id)
            self._commit(manifest)
        log.info("client key revoked", extra={"key_id": key_id})
        unconfirmed = await self.wait_for_followers(manifest.version, ack_timeout_s)
        body = {"id": key_id, "deleted": True, "unconfirmed_replicas": unconfirmed}
        return Answer(200, orjson.dumps(body))

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
            number = next_number(self._manifest, req.name)
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

    async def delete_adapter(self, name: str, ack_timeout_s: float) -> Answer:
        """Stop routing to the adapter (the answer comes once every live replica has); its
        versions are unloaded from every server once no request uses them."""
        self._start_background()
        async with self._lock:
            if name not in self._manifest.adapters:
                return Answer.error(
                    RouterError(404, f"no adapter {name!r} is registered", code="adapter_not_found")
                )
            manifest = without_adapter(self._manifest, name)
            self._commit(manifest)
        log.info("adapter deleted", extra={"adapter": name})
        unconfirmed = await self.wait_for_followers(manifest.version, ack_timeout_s)
        body = {
            "name": name,
            "deleted": True,
            "manifest_version": manifest.version,
            "unloading": sorted(r.lora for r in manifest.retiring if r.adapter == name),
            "unconfirmed_replicas": unconfirmed,
        }
        return Answer(200, orjson.dumps(body))

    async def adapters(self) -> Answer:
        return Answer(
            200, orjson.dumps({"version": self.version, "data": adapter_report(self._manifest)})
        )

    def _due(self, lora_name: str, provider_id: str) -> bool:
        return self._next_try.get((lora_name, provider_id), 0.0) <= time.monotonic()

    def _failed(self, what: str, lora_name: str, provider_id: str, why: str) -> None:
        self._next_try[(lora_name, provider_id)] = time.monotonic() + LORA_RETRY_S
        log.warning(
            f"adapter {what} failed",
            extra={"adapter": lora_name, "provider": provider_id, "reason": why},
        )

    def _drained(self, retired_in: int, name: str) -> bool:
        live = self._followers.live().values()
        return all(f.version >= retired_in and name not in f.busy for f in live)

    async def _unload_drained(self) -> None:
        now = time.monotonic()
        for old in self._manifest.retiring:
            since = self._retiring_since.setdefault(old.lora, now)
            if not self._drained(old.retired_in, old.lora) and now - since < DRAIN_TIMEOUT_S:
                continue
            await self._unload(old.lora, old.loaded)

    async def _unload(self, name: str, loaded: tuple[str, ...]) -> None:
        providers = providers_by_id(config_of(self._manifest))
        # A provider no longer in the config is not ours to call any more.
        gone = {pid for pid in loaded if pid not in providers}
        present = [providers[pid] for pid in loaded if pid in providers and self._due(name, pid)]
        reasons = await asyncio.gather(*(lora.unload(self._http(), p, name) for p in present))
        done = gone | {p.id for p, why in zip(present, reasons, strict=True) if why is None}
        for p, why in zip(present, reasons, strict=True):
            if why is not None:
                self._failed("unload", name, p.id, why)
        if done:
            async with self._lock:
                self._commit(with_unloaded(self._manifest, name, done))
            log.info("adapter version unloaded", extra={"adapter": name, "providers": len(done)})

    async def _reconcile(self) -> None:
        """Compare what each vLLM server lists with the manifest: versions a server no longer
        lists (it restarted, or does not answer) stop being routed there, and current versions
        missing on a server that answers are loaded there (a restarted server, a provider added
        by a reload, a load that failed at registration)."""
        targets = watched(self._manifest)
        if not targets:
            return
        async with self._lock:  # a registration's loads cannot land between listing and commit
            found = await asyncio.gather(*(lora.listing(self._http(), p) for p in targets.values()))
            listings = dict(zip(targets, found, strict=True))
            if self._commit(with_listings(self._manifest, listings)):
                log.info("adapter versions follow the servers' listings")
            manifest = self._manifest
        due = [
            load for load in loads_due(manifest, listings) if self._due(load.lora, load.provider.id)
        ]
        reasons = await asyncio.gather(
            *(lora.load(self._http(), d.provider, d.lora, d.source) for d in due)
        )
        for d, why in zip(due, reasons, strict=True):
            if why is not None:
                self._failed("load", d.lora, d.provider.id, why)
        loaded = [d for d, why in zip(due, reasons, strict=True) if why is None]
        if loaded:
            async with self._lock:  # one new version for the round, not one per load
                self._commit(with_loaded(self._manifest, loaded))
            log.info(
                "adapter versions loaded",
                extra={"loaded": sorted(f"{d.lora} on {d.provider.id}" for d in loaded)},
            )
