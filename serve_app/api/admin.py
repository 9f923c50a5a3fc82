"""The admin API (`/api/v1/...`, admin token): config reloads and weights, provider state,
profiles and provisioning, LoRA adapters. `Admin` holds what the endpoints act on; the registry
actor does the work."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import watchfiles
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from serve_app.api.auth import AdminThrottle, admin_refusal, client_address
from serve_app.api.http import log, read_body, replica
from serve_app.api.openapi import json_body
from serve_app.cluster.broker import broker_handle
from serve_app.cluster.follow import Follower
from serve_app.cluster.monitor import monitor_handle
from serve_app.cluster.registry.actor import Answer, Published, RegistryRef
from serve_app.cluster.registry.adapters import AdapterRegistration
from serve_app.cluster.registry.manifest import Manifest, WeightsUpdate
from serve_app.core.config import (
    ConfigError,
    RouterConfig,
    masked_tokens,
    parse_config,
    read_raw,
)
from serve_app.core.errors import RouterError
from serve_app.ingress.gateway import Gateway, router_error
from serve_app.provision.manager import LLMModelManager, ProvisionRequest
from serve_app.provision.profiles import DEFAULT_PROFILE, KIND, parse_profiles, read_profiles
from serve_app.upstreams.base import JSON

ADMIN_MAX_BODY_BYTES = 1024 * 1024
Body = TypeVar("Body", bound=BaseModel)

router = APIRouter()


class AdminSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # The models config file that `POST /api/v1/config/reload` and the watcher re-read.
    config_path: str
    # configs/llm_models.json, re-read with the models config; None: no profiles.
    profiles_path: str | None = None
    active_profile: str = DEFAULT_PROFILE
    # How long an admin change waits for every replica to confirm it before answering.
    ack_timeout_s: float = 5.0


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


async def validated_body(
    request: Request, model: type[Body], code: str, empty: bytes | None = None
) -> Body:
    """An admin request's JSON body as `model` (`empty` stands for a missing body); 400 with
    the first problem otherwise."""
    body = await read_body(request, ADMIN_MAX_BODY_BYTES, replica().gateway.body.timeout_s)
    if not body and empty is not None:
        body = empty
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RouterError(400, _first_problem(exc), code=code) from None


def relayed(answer: object) -> Response:
    """A registry actor's Answer, as the HTTP response it describes."""
    assert isinstance(answer, Answer)
    return Response(answer.body, status_code=answer.status, media_type=JSON)


def json_response(doc: object) -> Response:
    return Response(orjson.dumps(doc), media_type=JSON)


class Admin:
    def __init__(
        self,
        follower: Follower[Manifest],
        registry: RegistryRef,
        gateway: Gateway,
        settings: AdminSettings,
        token: str | None,
    ) -> None:
        self.follower = follower
        self.registry = registry
        self.gateway = gateway
        self.settings = settings
        self._token = token
        self._throttle = AdminThrottle()
        self.manager: LLMModelManager | None = None

    def apply(self, config: RouterConfig) -> None:
        if self.manager is None:
            self.manager = LLMModelManager(self.gateway.roles, config, self.registry)
        else:
            self.manager.update(self.gateway.roles, config)

    def check(self, request: Request) -> None:
        """RouterError unless the request carries the admin token ($LLM_ROUTER_ADMIN_TOKEN);
        429 while its address (or everyone) has failed too often (api/auth.py)."""
        peer = request.client.host if request.client else None
        client = client_address(request.headers.getlist("x-forwarded-for"), peer)
        err = self._throttle.refusal(client) or admin_refusal(
            request.headers.get("authorization"), self._token
        )
        if err is None:
            return
        if err.code == "invalid_admin_token":
            self._throttle.failed(client)
            if (locked := self._throttle.refusal(client)) is not None:
                log.warning(
                    "admin attempts throttled",
                    extra={"client": client, "retry_after_s": locked.headers["retry-after"]},
                )
        raise err

    def holds_token(self, request: Request) -> bool:
        """Whether the request carries the admin token (it may read every key's data)."""
        return admin_refusal(request.headers.get("authorization"), self._token) is None

    async def call(self, method: str, *args: object) -> object:
        """A registry actor method's result; 503 registry_unavailable if it cannot be reached."""
        try:
            return await getattr(self.follower.actor(), method).remote(*args)
        except Exception as exc:
            log.warning(
                "registry call failed", extra={"method": method, "reason": type(exc).__name__}
            )
            raise RouterError(
                503,
                "the adapter registry is unavailable; retry",
                type="api_error",
                code="registry_unavailable",
            ) from None

    async def publish_file(self) -> dict[str, object]:
        """Re-read the models config file and publish it; RouterError (400) if it is invalid."""
        settings = self.settings
        try:
            raw, source = read_raw(settings.config_path)
            types = set(parse_config(raw, source).model_types)
            profiles = (
                None if settings.profiles_path is None else read_profiles(settings.profiles_path)
            )
            if profiles is not None:  # both files valid before either is published
                parse_profiles(*profiles).roles(settings.active_profile)
            published = await self.call("publish_config", raw, source)
            assert isinstance(published, Published)
            changed = published.checked(source).changed
            if profiles is not None:
                published = await self.call("publish_profiles", *profiles, settings.active_profile)
                assert isinstance(published, Published)
                changed |= published.checked(profiles[1], KIND).changed
        except ConfigError as exc:
            raise RouterError(400, str(exc), code="invalid_config") from None
        unconfirmed = await self.call(
            "wait_for_followers", published.version, settings.ack_timeout_s
        )
        return {
            "version": published.version,
            "changed": changed,  # the models config, the profiles or both
            "source": source,
            # Model types with no router deployment yet: `serve deploy` adds them.
            "needs_redeploy": sorted(types - self.gateway.model_types),
            "unconfirmed_replicas": unconfirmed,
        }

    async def watch(self) -> None:
        """Publish the models config file whenever it changes (`watch_config`)."""
        path = Path(self.settings.config_path).resolve()
        async for _ in watchfiles.awatch(
            path.parent, watch_filter=lambda _, changed: Path(changed) == path
        ):
            try:
                answer = await self.publish_file()
            except RouterError as err:
                log.warning("watched config rejected", extra={"reason": err.message})
            else:
                log.info("watched config published", extra={"version": answer["version"]})


def admin_from(request: Request) -> Admin:
    """This replica's admin state, once the request has shown the admin token."""
    admin: Admin = replica().admin
    admin.check(request)
    return admin


@router.post("/api/v1/config/reload")
async def reload_config(request: Request) -> Response:
    return json_response(await admin_from(request).publish_file())


@router.post("/api/v1/weights", openapi_extra=json_body(WeightsUpdate))
async def set_weights(request: Request) -> Response:
    """Runtime weights (weighted, dynamic_weighted, weighted_random): written into the
    published models config as a new version, until the file is reloaded."""
    admin = admin_from(request)
    update = await validated_body(request, WeightsUpdate, "invalid_weights")
    published = await admin.call("publish_weights", update)
    assert isinstance(published, Published)
    try:
        published.checked(admin.follower.state.config_source)
    except ConfigError as exc:
        raise RouterError(400, str(exc), code="invalid_weights") from None
    unconfirmed = await admin.call(
        "wait_for_followers", published.version, admin.settings.ack_timeout_s
    )
    return json_response(
        {
            "version": published.version,
            "changed": published.changed,
            "model": update.model,
            "weights": update.weights,
            "unconfirmed_replicas": unconfirmed,
        }
    )


@router.get("/api/v1/providers/state")
async def provider_state(request: Request) -> Response:
    """The shared routing state: slots taken per provider and by which replica, host pins,
    requests waiting for a slot, use counts, latency averages, keep-alive warms, the prefix
    index; per provider its circuit, load signals and prefix index size; the requests waiting
    in flow control's queues by model and priority; and the health view's version with the one
    each picker replica has applied."""
    admin = admin_from(request)
    try:
        state, health = await asyncio.wait_for(
            asyncio.gather(
                broker_handle(admin.registry).state.remote(),
                monitor_handle(admin.registry).state.remote(),
            ),
            5.0,
        )
    except Exception:
        raise router_error(503, "the routing state is unavailable") from None
    providers, queues = health.pop("providers"), health.pop("queues", {})
    entries = state["prefix_index"]["entries"]
    for pid, row in providers.items():
        row["prefix_index_entries"] = entries.get(pid, 0)
    return json_response({**state, "providers": providers, "queues": queues, "health": health})


@router.get("/api/v1/status")
async def status(request: Request) -> Response:
    """One row per model and provider: tier, state (and why), in flight, the upstream's load,
    requests and 5xx answers so far (`serve-router status` reads it twice for rates)."""
    admin = admin_from(request)
    try:
        rows = await asyncio.wait_for(monitor_handle(admin.registry).status.remote(), 5.0)
    except Exception:
        raise router_error(503, "the status is unavailable") from None
    return json_response({"data": [row.model_dump() for row in rows]})


@router.get("/api/v1/config")
async def config_status(request: Request) -> Response:
    admin = admin_from(request)
    followers = await admin.call("followers")
    manifest = admin.follower.state
    type_of = admin.gateway.type_of
    return json_response(
        {
            "version": manifest.version,
            "source": manifest.config_source,
            "models": {
                t: sorted(m for m, g in type_of.items() if g == t)
                for t in admin.gateway.model_types
            },
            "replicas": followers,
            # The published models config itself, api tokens masked.
            "config": masked_tokens(manifest.models_config),
        }
    )


@router.get("/api/v1/overview")
async def overview(request: Request) -> Response:
    """The console's Overview in one read: per model type and model, each provider's status
    row (as /api/v1/status: tier, state and why, circuit, last probe, in flight, load); the
    last 15 minutes of per-model rates and latencies (core/series.py); the flow-control
    queues."""
    admin = admin_from(request)
    try:
        health = await asyncio.wait_for(monitor_handle(admin.registry).overview.remote(), 5.0)
    except Exception:
        raise router_error(503, "the routing state is unavailable") from None
    types: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in health["rows"]:
        models = types.setdefault(row.model_type, {})
        models.setdefault(row.model, []).append(
            row.model_dump(mode="json", exclude={"model_type", "model"})
        )
    return json_response({"types": types, "queues": health["queues"], "series": health["series"]})


@router.get("/api/v1/models")
async def model_profiles(request: Request) -> Response:
    """The active profile with its resolved roles, and every profile in the manifest."""
    admin = admin_from(request)
    manifest = admin.follower.state
    gateway = admin.gateway
    roles = {
        key: role.model_dump() | {"model": gateway.role_models.get(key)}
        for key, role in gateway.roles.items()
    }
    return json_response(
        {
            "active_profile": manifest.active_profile,
            "source": manifest.profiles_source or None,
            "roles": roles,
            "profiles": sorted((manifest.profiles or {}).get("profiles", {})),
        }
    )


@router.post("/api/v1/models/provision", openapi_extra=json_body(ProvisionRequest))
async def provision(request: Request, stream: Annotated[bool, Query()] = False) -> Response:
    """Ensure the roles' models are on their providers; monGARS's provisioning report. With
    `?stream=true`, NDJSON as it happens: `start` per (role, provider), Ollama's pull
    `progress` lines, a `status` per report line, then `done` with the whole report."""
    admin = admin_from(request)
    req = await validated_body(request, ProvisionRequest, "invalid_request", b"{}")
    assert admin.manager is not None
    if stream:
        return StreamingResponse(_provision_events(admin.manager, req), media_type=NDJSON)
    return json_response(await admin.manager.ensure_models_installed(req.roles, req.force))


NDJSON = "application/x-ndjson"


async def _provision_events(
    manager: LLMModelManager, req: ProvisionRequest
) -> AsyncIterator[bytes]:
    """The run's events, one JSON line each, as the manager emits them (those of the roles
    asked for: another caller's run may be under way beside this one)."""
    wanted = {r.lower() for r in req.roles} if req.roles else None
    events = manager.subscribe()
    run = asyncio.ensure_future(manager.ensure_models_installed(req.roles, req.force))
    # The run's events are all queued before it ends: None after them marks the end.
    run.add_done_callback(lambda _: events.put_nowait(None))
    try:
        while (event := await events.get()) is not None:
            if wanted is None or event["role"].split(":")[0] in wanted:
                yield orjson.dumps(event) + b"\n"
        yield orjson.dumps({"event": "done", **run.result()}) + b"\n"
    finally:
        manager.unsubscribe(events)


@router.post("/api/v1/adapters", openapi_extra=json_body(AdapterRegistration))
async def register_adapter(request: Request) -> Response:
    admin = admin_from(request)
    req = await validated_body(request, AdapterRegistration, "invalid_adapter")
    return relayed(await admin.call("register_adapter", req, admin.settings.ack_timeout_s))


@router.delete("/api/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request) -> Response:
    """The adapter stops being a model at once; its versions are unloaded from every server
    once no request uses them."""
    admin = admin_from(request)
    return relayed(await admin.call("delete_adapter", name, admin.settings.ack_timeout_s))


@router.get("/api/v1/adapters")
async def list_adapters(request: Request) -> Response:
    return relayed(await admin_from(request).call("adapters"))
