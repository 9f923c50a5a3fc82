"""The actor that owns the responses store: one per registry, named after it, detached, restarted
when it dies, pinned to the head node with its database beside the registry's file (so a
restart, or a new actor after one was killed, opens the same responses). It follows the
manifest for its bounds (the models config's `responses` block).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path

import ray
from ray.actor import ActorHandle

from serve_app.cluster.registry.actor import RegistryRef
from serve_app.cluster.registry.companion import ManifestCompanion, companion_handle
from serve_app.cluster.registry.manifest import Manifest, config_of
from serve_app.conversations.chain import RUNNING, StoredResponse
from serve_app.conversations.store import ResponseStore, finished
from serve_app.core.config import ResponsesConfig

log = logging.getLogger(__name__)

DB_NAME = "responses.sqlite3"
# Calls at once: each running background response holds one (its runner's wait_settled).
MAX_CALLS = 20_000
# How often responses past their TTL are dropped when nothing is written.
EVICT_S = 60.0
# How often the write-ahead log of the ingress replicas' writes goes into the file.
CHECKPOINT_S = 1.0


def responses_handle(registry: RegistryRef) -> ActorHandle:
    """The registry's responses store; created if there is none."""
    return companion_handle(
        ResponsesActor, registry, "responses", on_head=True, max_concurrency=MAX_CALLS
    )


@ray.remote
class ResponsesActor(ManifestCompanion):
    def __init__(self, registry: RegistryRef, role: str) -> None:
        super().__init__(registry, role)
        limits = ResponsesConfig()
        self._path = Path(registry.path).resolve().parent / DB_NAME
        self._store = ResponseStore(self._path, limits.store_ttl_s, limits.max_bytes)
        self._settled: dict[str, asyncio.Event] = {}  # running background responses

    def _apply(self, manifest: Manifest) -> None:
        if manifest.models_config is not None:
            limits = config_of(manifest).responses
            self._store.limit(limits.store_ttl_s, limits.max_bytes)

    async def _background(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(CHECKPOINT_S)
            ticks += 1
            try:
                if ticks % int(EVICT_S / CHECKPOINT_S) == 0:
                    self._store.evict()
                self._store.checkpoint()
            except sqlite3.Error as exc:  # a lock held too long, a full disk: next tick again
                log.warning("responses store upkeep failed", extra={"reason": type(exc).__name__})

    async def where(self) -> tuple[str, str]:
        """The node it runs on and its database file: ingress replicas on that node use the
        file directly (store.py)."""
        await self._ensure_started()
        return ray.get_runtime_context().get_node_id(), str(self._path)

    async def get(self, response_id: str, owner: str | None) -> bytes | None:
        """The record's JSON (StoredResponse), if `owner` may see it."""
        await self._ensure_started()
        return _json(self._store.get(response_id, owner))

    async def put(self, record: bytes) -> bool:
        """Stores a response (a new one, or a background one as it starts)."""
        await self._ensure_started()
        return self._store.put(StoredResponse.model_validate_json(record))

    async def finish(self, record: bytes) -> bytes | None:
        """A background response's new state: the record as stored (one cancelled meanwhile
        stays cancelled), or None when it was deleted (its runner then stops)."""
        await self._ensure_started()
        ended = StoredResponse.model_validate_json(record)
        stored = self._store.get(ended.id, None)
        if stored is None or stored.status not in RUNNING:
            return _json(stored)
        ended = self._store.end(ended)
        if ended.status not in RUNNING:
            self._wake(ended.id)
        return _json(ended)

    async def delete(self, response_id: str, owner: str | None) -> bool:
        """Deletes a response; a running background one's runner is woken and stops."""
        await self._ensure_started()
        deleted = self._store.delete(response_id, owner)
        if deleted:
            self._wake(response_id)
        return deleted

    async def cancel(self, response_id: str, owner: str | None) -> bytes | None:
        """A running background response ends as cancelled (its runner is woken to stop the
        upstream call); any other is returned as it is."""
        await self._ensure_started()
        record = self._store.get(response_id, owner)
        if record is not None and record.background and record.status in RUNNING:
            record = finished(record, "cancelled")
            self._store.put(record)
            self._wake(response_id)
        return _json(record)

    async def wait_settled(self, response_id: str, timeout_s: float) -> str | None:
        """Returns once a running background response is no longer running (its status), or
        None after `timeout_s`."""
        await self._ensure_started()
        record = self._store.get(response_id, None)
        if record is None or record.status not in RUNNING:
            return None if record is None else record.status
        event = self._settled.setdefault(response_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
        record = self._store.get(response_id, None)
        return None if record is None else record.status

    def _wake(self, response_id: str) -> None:
        event = self._settled.pop(response_id, None)
        if event is not None:
            event.set()


def _json(record: StoredResponse | None) -> bytes | None:
    return None if record is None else record.model_dump_json().encode()
