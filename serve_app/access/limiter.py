"""The limiter actor: the one set of books for every key's limits and usage, across ingress
replicas on any node (what llm-router keeps in Redis). Replicas take short leases of allowance
from it (serve_app/access/gate.py), so most requests never call here, and send it their usage
in batches. Budgets spent and usage are written to a file beside the registry's manifest, so
they survive the actor's and the registry's restarts."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import orjson
import ray
from ray.actor import ActorHandle

from serve_app.access.history import UsageHistory, Window
from serve_app.access.keys import KeyRecord
from serve_app.access.ledger import Grant, Ledger, Used
from serve_app.cluster.registry import store
from serve_app.cluster.registry.actor import RegistryRef
from serve_app.cluster.registry.companion import ManifestCompanion, companion_handle
from serve_app.cluster.registry.manifest import Manifest

SAVE_S = 1.0
KINDS = ("prompt", "completion")


def limiter_handle(registry: RegistryRef) -> ActorHandle:
    return companion_handle(Limiter, registry, "limiter")


class Usage(NamedTuple):
    """What a key's answers for one model used, summed by a replica between two reports.
    `estimated`: how many had no counts from the upstream (the router's estimate stands in).
    `correction`: tokens beyond (or short of) what leases granted for them, in the key's minute
    `window`."""

    key_id: str
    model: str
    window: int
    prompt: int
    completion: int
    requests: int
    estimated: int
    correction: int


def usage_path(registry: RegistryRef) -> Path:
    return Path(registry.path).with_suffix(".usage.json")


@ray.remote
class Limiter(ManifestCompanion):
    def __init__(self, registry: RegistryRef, role: str) -> None:
        super().__init__(registry, role)
        self._ledger = Ledger()
        self._records: dict[str, KeyRecord] = {}
        # key id -> model -> counts (prompt, completion, requests, estimated requests)
        self._usage: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
        self._path = usage_path(registry)
        self._dirty = False
        saved = store.load(self._path)
        doc = orjson.loads(saved) if saved else {}
        self._ledger.budgets = {k: (v[0], v[1]) for k, v in doc.get("budgets", {}).items()}
        self._usage.update(doc.get("usage", {}))
        self._history = UsageHistory(doc.get("history"))

    def _apply(self, manifest: Manifest) -> None:
        self._records = dict(manifest.keys)

    async def _background(self) -> None:
        while True:
            await asyncio.sleep(SAVE_S)
            if self._dirty:
                self._dirty = False
                doc = {
                    "budgets": self._ledger.budgets,
                    "usage": self._usage,
                    "history": self._history.dump(),
                }
                data = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)  # history's int keys
                await asyncio.to_thread(store.save, self._path, data)

    async def take(self, key_id: str, holder: str, tokens: int, used: Used) -> Grant | None:
        """A lease for `holder`, which used `used` of its last one; None: no such key."""
        await self._ensure_started()
        record = self._records.get(key_id)
        if record is None:
            return None
        self._dirty = True
        return self._ledger.take(record, holder, tokens, used, time.time())

    async def give_back(self, key_id: str, holder: str, used: Used) -> None:
        await self._ensure_started()
        record = self._records.get(key_id)
        if record is not None:
            self._ledger.give_back(record, holder, used, time.time())
            self._dirty = True

    async def report(self, batch: list[Usage]) -> None:
        await self._ensure_started()
        now = time.time()
        for u in batch:
            record = self._records.get(u.key_id)
            if record is not None and u.correction:
                self._ledger.correct(record, u.window, u.correction, now)
            counts = self._usage[u.key_id].setdefault(
                u.model, {"prompt": 0, "completion": 0, "requests": 0, "estimated_requests": 0}
            )
            counts["prompt"] += u.prompt
            counts["completion"] += u.completion
            counts["requests"] += u.requests
            counts["estimated_requests"] += u.estimated
            self._history.add(u.key_id, u.model, u.requests, u.prompt, u.completion, now)
        self._dirty = True

    async def history(self, key_id: str, window: Window) -> dict[str, object]:
        """A key's usage per model in each bucket of the last hour, day or 30 days."""
        await self._ensure_started()
        return self._history.series(key_id, window, time.time())

    async def usage(self, key_id: str) -> dict[str, object]:
        """A key's usage per model since it was made, its budget period so far, and the
        replicas that took its allowance in this minute."""
        await self._ensure_started()
        start, used = self._ledger.budgets.get(key_id, (None, 0))
        record = self._records.get(key_id)
        return {
            "models": self._usage.get(key_id, {}),
            "budget": {"period_start": start, "used": used},
            "replicas_this_minute": []
            if record is None
            else self._ledger.takers(record, time.time()),
        }
