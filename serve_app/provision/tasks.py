"""One role on one provider, as a Ray task on the node that hosts that provider.

Placement rule: a provider's optional `ray_resource` names a custom Ray resource that only its
node carries (e.g. `"ray_resource": "gpu_node_71"`); else the one alive node whose IP is the
`api_host`'s; else the caller's own node, which the report says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson
import ray
from pydantic import BaseModel
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve_app.config import ProviderConfig
from serve_app.profiles import Role
from serve_app.provision import upstreams

log = logging.getLogger("scripts.models.provision")

Action = Literal["exists", "installed", "updated", "skipped", "error", "unavailable"]
ENSURED = frozenset({"exists", "installed", "updated"})
LOCAL_PROVIDERS = frozenset({"ollama", "vllm"})


class Status(BaseModel):
    """One line of the seed's report; `provider_id`, `node`, `duration_s` are additions."""

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


async def _provision(provider: ProviderConfig, role_key: str, role: Role, force: bool) -> Status:
    status = Status(role=role_key, name=role.name, provider=role.provider, action="error")
    async with aiohttp.ClientSession() as session:
        try:
            present = upstreams.has_model(await upstreams.list_models(session, provider), role.name)
        except upstreams.Unreachable as exc:
            return status.model_copy(update={"action": "unavailable", "detail": str(exc)})
        except upstreams.Failed as exc:
            return status.model_copy(update={"detail": f"list_failed: {exc}"})
        if present and not force:
            return status.model_copy(update={"action": "exists"})
        if provider.api_type == "vllm":
            if present:
                return status.model_copy(update={"action": "exists"})
            return status.model_copy(
                update={"detail": "missing_on_vllm: vLLM serves only the models it started with"}
            )
        if not present and not role.auto_download:
            return status.model_copy(
                update={"action": "skipped", "detail": "auto_download_disabled"}
            )

        def progress(line: dict[str, object]) -> None:
            event = {"event": "pull progress", "role": role_key, "provider_id": provider.id}
            log.info(orjson.dumps({**event, **line}).decode())

        try:
            await upstreams.pull(session, provider, role.name, progress)
        except upstreams.Failed as exc:
            return status.model_copy(update={"detail": f"download_failed: {exc}"})
    return status.model_copy(update={"action": "updated" if present else "installed"})


@ray.remote(num_cpus=0, max_retries=0)
def provision_on_node(provider: ProviderConfig, role_key: str, role: Role, force: bool) -> Status:
    if not log.handlers:  # progress lines go to the worker's stderr, which Ray forwards
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
    started = time.monotonic()
    status = asyncio.run(_provision(provider, role_key, role, force))
    return status.model_copy(
        update={
            "provider_id": provider.id,
            "node": ray.get_runtime_context().get_node_id(),
            "duration_s": round(time.monotonic() - started, 3),
        }
    )
