"""One role on one provider, as a Ray task on the node that hosts that provider.

Placement rule: a provider's optional `ray_resource` names a custom Ray resource that only its
node carries (e.g. `"ray_resource": "gpu_node_71"`); else the one alive node whose IP is the
`api_host`'s; else the caller's own node, which the report says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import ray
from pydantic import BaseModel
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve_app.core.config import ProviderConfig
from serve_app.provision import upstreams
from serve_app.provision.profiles import Role

Action = Literal["exists", "installed", "updated", "skipped", "error", "unavailable"]
ENSURED = frozenset({"exists", "installed", "updated"})
LOCAL_PROVIDERS = frozenset({"ollama", "vllm"})


class Progress(BaseModel):
    """One of Ollama's pull progress lines, on its way from the provider's node to the caller."""

    role: str
    provider_id: str
    line: dict[str, Any]


class Status(BaseModel):
    """One line of monGARS's provisioning report (`provider_id`, `node`, `duration_s` added)."""

    role: str
    name: str
    provider: str
    action: Action
    detail: str | None = None
    provider_id: str | None = None
    node: str | None = None
    duration_s: float = 0.0


def placement(provider: ProviderConfig) -> tuple[dict[str, Any], str | None]:
    """Ray options that put the task on the provider's node, and a note when none matched."""
    resource = (provider.model_extra or {}).get("ray_resource")
    if isinstance(resource, str) and resource:
        if resource in ray.cluster_resources():
            return {"resources": {resource: 0.001}}, None
        note = f"no Ray node has resource {resource!r}"
    else:
        host = urlsplit(provider.api_host).hostname
        nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == host]
        if len(nodes) == 1:
            strategy = NodeAffinitySchedulingStrategy(nodes[0]["NodeID"], soft=False)
            return {"scheduling_strategy": strategy}, None
        note = f"no single Ray node has IP {host}"
    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(here, soft=False)
    return {"scheduling_strategy": strategy}, f"{note}; ran on the caller's node"


async def _provision(
    provider: ProviderConfig, role_key: str, role: Role, force: bool
) -> AsyncIterator[Progress | Status]:
    """Pull progress lines as they come, then the Status."""
    status = Status(role=role_key, name=role.name, provider=role.provider, action="error")
    async with aiohttp.ClientSession() as session:
        try:
            present = upstreams.has_model(await upstreams.list_models(session, provider), role.name)
        except upstreams.Unreachable as exc:
            yield status.model_copy(update={"action": "unavailable", "detail": str(exc)})
            return
        except upstreams.Failed as exc:
            yield status.model_copy(update={"detail": f"list_failed: {exc}"})
            return
        if present and (not force or provider.api_type == "vllm"):
            yield status.model_copy(update={"action": "exists"})
            return
        if provider.api_type == "vllm":
            detail = "missing_on_vllm: vLLM serves only the models it started with"
            yield status.model_copy(update={"detail": detail})
            return
        if not present and not role.auto_download:
            yield status.model_copy(
                update={"action": "skipped", "detail": "auto_download_disabled"}
            )
            return
        try:
            async for line in upstreams.pull(session, provider, role.name):
                yield Progress(role=role_key, provider_id=provider.id, line=line)
        except upstreams.Failed as exc:
            yield status.model_copy(update={"detail": f"download_failed: {exc}"})
            return
    yield status.model_copy(update={"action": "updated" if present else "installed"})


@ray.remote(num_cpus=0, max_retries=0)
def provision_on_node(
    provider: ProviderConfig, role_key: str, role: Role, force: bool
) -> Iterator[Progress | Status]:
    """A streaming task: the caller gets each progress line as it happens, then the Status."""
    started = time.monotonic()
    loop = asyncio.new_event_loop()
    steps = _provision(provider, role_key, role, force)
    try:
        while True:
            try:
                item = loop.run_until_complete(anext(steps))
            except StopAsyncIteration:
                return
            if isinstance(item, Status):
                item = item.model_copy(
                    update={
                        "provider_id": provider.id,
                        "node": ray.get_runtime_context().get_node_id(),
                        "duration_s": round(time.monotonic() - started, 3),
                    }
                )
            yield item
    finally:
        loop.close()
