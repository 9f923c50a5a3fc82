"""monGARS's LLMModelManager: `ensure_models_installed`, with its report format.

Roles that ended `exists`/`installed`/`updated` are cached for the life of the process (`force`
bypasses the cache); concurrent calls for one role share one provisioning run (single flight)
while different roles run in parallel. Each (role, provider) runs as a Ray task on the
provider's node (see tasks.py). A role's `adapters` are registered through the adapter registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from serve_app.cluster.registry.actor import RegistryRef
from serve_app.cluster.registry.adapters import AdapterRegistration
from serve_app.cluster.registry.manifest import Manifest
from serve_app.core.config import ProviderConfig, RouterConfig
from serve_app.provision.profiles import AdapterSpec, Role
from serve_app.provision.tasks import (
    ENSURED,
    LOCAL_PROVIDERS,
    Progress,
    Status,
    placement,
    provision_on_node,
)

log = logging.getLogger("scripts.models.provision")


class ProvisionRequest(BaseModel):
    """`POST /api/v1/models/provision`."""

    model_config = ConfigDict(extra="forbid")

    roles: list[str] | None = None
    force: bool = False


def _serving(config: RouterConfig, role: Role) -> list[tuple[str, ProviderConfig]]:
    """(model name, provider) for each provider of the role's kind whose upstream model is the
    role's model, in config order."""
    return [
        (model_name, p)
        for group in config.model_types.values()
        for model_name, model in group.models.items()
        for p in (*model.providers, *model.providers_sleep)
        if p.api_type == role.provider and (p.model_path or model_name) == role.name
    ]


def role_providers(config: RouterConfig, role: Role) -> list[ProviderConfig]:
    return [p for _, p in _serving(config, role)]


def role_models(config: RouterConfig, roles: dict[str, Role]) -> dict[str, str]:
    """Role -> the configured model that serves it: one named like the role's model, else one
    with a provider of the role's kind whose upstream model it is."""
    type_of = config.model_type_of()
    out = {}
    for key, role in roles.items():
        if role.name in type_of:
            out[key] = role.name
        elif serving := _serving(config, role):
            out[key] = serving[0][0]
    return out


def auto_pull_models(config: RouterConfig, roles: dict[str, Role]) -> dict[str, str]:
    """Model name -> role, for models served by an Ollama provider of an auto_download role."""
    return {
        model_name: key
        for key, role in roles.items()
        if role.provider == "ollama" and role.auto_download
        for model_name, _ in _serving(config, role)
    }


class LLMModelManager:
    def __init__(
        self, roles: dict[str, Role], config: RouterConfig, registry: RegistryRef | None = None
    ) -> None:
        self._roles = roles
        self._config = config
        self._registry = registry
        # Role key -> what was ensured for it: the role and the providers serving it then.
        self._ensured: dict[str, tuple[Role, tuple[str, ...]]] = {}
        self._flights: dict[str, asyncio.Task[list[Status]]] = {}
        # Queues of the callers streaming provisioning as it happens (`subscribe`).
        self._listeners: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        """A queue of every provisioning event from now on (start, pull progress, status)
        until `unsubscribe`: how the admin API streams a run as it happens. The subscriber may
        put None in it to mark its own end."""
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._listeners.add(events)
        return events

    def unsubscribe(self, events: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._listeners.discard(events)

    def _emit(self, event: dict[str, Any]) -> None:
        for events in self._listeners:
            events.put_nowait(event)

    def update(self, roles: dict[str, Role], config: RouterConfig) -> None:
        """New profiles or models config; what was ensured stays ensured while its role names
        the same model on the same providers (a role pointed elsewhere is ensured again)."""
        self._roles, self._config = roles, config

    async def ensure_models_installed(
        self, roles: list[str] | None = None, force: bool = False
    ) -> dict[str, list[dict[str, Any]]]:
        keys = [r.lower() for r in roles] if roles else list(self._roles)
        groups = await asyncio.gather(*(self.ensure_role(key, force) for key in keys))
        return {"statuses": [s.model_dump() for group in groups for s in group]}

    async def ensure_role(self, key: str, force: bool = False) -> list[Status]:
        role = self._roles.get(key)
        if role is None:
            known = ", ".join(sorted(self._roles)) or "none"
            detail = f"unknown_role: not in the active profile (roles: {known})"
            return [Status(role=key, name="", provider="", action="error", detail=detail)]
        if not force and self._ensured.get(key) == self._as_ensured(role):
            return [
                Status(
                    role=key,
                    name=role.name,
                    provider=role.provider,
                    action="skipped",
                    detail="already_ensured",
                )
            ]
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._provision(key, role, force))
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)

    async def _provision(self, key: str, role: Role, force: bool) -> list[Status]:
        base = Status(role=key, name=role.name, provider=role.provider, action="skipped")
        if role.provider not in LOCAL_PROVIDERS:
            statuses = [base.model_copy(update={"detail": "unsupported_provider"})]
        else:
            providers = role_providers(self._config, role)
            if not providers:
                detail = f"no_provider: no active {role.provider} provider serves {role.name}"
                statuses = [base.model_copy(update={"action": "error", "detail": detail})]
            else:
                statuses = list(
                    await asyncio.gather(*(self._run(p, key, role, force) for p in providers))
                )
        statuses += [await self._adapter(key, role, spec) for spec in role.adapters]
        for s in statuses:
            self._emit({"event": "status", **s.model_dump()})
            event = {"event": "role provisioned", "role": s.role, "provider_id": s.provider_id}
            log.info(orjson.dumps({**event, "action": s.action, "detail": s.detail}).decode())
        if statuses and all(s.action in ENSURED for s in statuses):
            self._ensured[key] = self._as_ensured(role)
        return statuses

    def _as_ensured(self, role: Role) -> tuple[Role, tuple[str, ...]]:
        return role, tuple(sorted(p.id for p in role_providers(self._config, role)))

    async def _run(self, provider: ProviderConfig, key: str, role: Role, force: bool) -> Status:
        options, note = placement(provider)
        status: Status | None = None
        self._emit({"event": "start", "role": key, "name": role.name, "provider_id": provider.id})
        try:
            async for ref in provision_on_node.options(**options).remote(
                provider, key, role, force
            ):
                item = await ref
                if isinstance(item, Progress):
                    event = {"event": "pull progress", "role": key, "provider_id": provider.id}
                    self._emit({**item.line, **event, "event": "progress"})
                    log.info(orjson.dumps({**event, **item.line}).decode())
                else:
                    status = item
        except Exception as exc:  # the task's node died, or the task could not run
            status = Status(
                role=key,
                name=role.name,
                provider=role.provider,
                action="error",
                detail=f"task_failed: {type(exc).__name__}",
                provider_id=provider.id,
            )
        assert status is not None  # the task always ends with its Status
        if note:
            detail = f"{status.detail}; {note}" if status.detail else note
            status = status.model_copy(update={"detail": detail})
        return status

    async def _adapter(self, key: str, role: Role, spec: AdapterSpec) -> Status:
        """An adapter of the role's model, registered (or refreshed) through the registry."""
        status = Status(
            role=f"{key}:{spec.name}", name=spec.name, provider="adapter", action="error"
        )
        if self._registry is None:
            return status.model_copy(update={"detail": "no adapter registry"})
        started = time.monotonic()
        registry = self._registry.handle()
        manifest: Manifest = await registry.current.remote()
        current = manifest.adapters.get(spec.name)
        if current is not None and (current.current.source == spec.source or not spec.auto_update):
            return status.model_copy(update={"action": "exists"})
        base = role_models(self._config, {key: role}).get(key)
        if base is None:
            return status.model_copy(update={"detail": f"no_provider: nothing serves {role.name}"})
        req = AdapterRegistration(base_model=base, name=spec.name, source=spec.source)
        answer = await registry.register_adapter.remote(req, 5.0)
        doc = orjson.loads(answer.body)
        duration = round(time.monotonic() - started, 3)
        if answer.status != 201:
            detail = f"adapter_failed: {doc['error']['message']}"
            return status.model_copy(update={"detail": detail, "duration_s": duration})
        action = "updated" if current is not None else "installed"
        detail = f"version {doc['version']}"
        return status.model_copy(
            update={"action": action, "detail": detail, "duration_s": duration}
        )
