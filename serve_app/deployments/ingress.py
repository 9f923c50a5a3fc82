"""The HTTP front: validates a request, picks its model type's router, relays the answer.

No `from __future__ import annotations` here: Serve rebuilds the endpoint signatures and FastAPI
must see real `Request` annotations, not strings. Every helper the class uses is defined above
it: the decorators pickle the class where it stands, so a later name is missing in the replica.

The body crosses the hop as the client's raw bytes plus a small RequestMeta tuple, so it is
parsed once here (by pydantic-core) and re-encoded only where an upstream needs another shape.
"""

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import orjson
import ray.serve.context
import watchfiles
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from serve_app.admin import ADMIN_TOKEN_ENV, admin_refusal
from serve_app.broker import broker_handle
from serve_app.coalesce import Coalescer
from serve_app.config import ConfigError, parse_config, read_raw
from serve_app.dispatch import (
    ATTEMPTS_HEADER,
    PROVIDER_HEADER,
    UNSERVABLE_HEADER,
    Head,
    Unary,
    error_answer,
)
from serve_app.errors import RouterError, adapter_unavailable, model_not_found
from serve_app.follow import Follower
from serve_app.handler import ApiModelConfig
from serve_app.local.loopback import keep_replica_grpc_on_loopback
from serve_app.metrics import Tally
from serve_app.monitor import monitor_handle
from serve_app.openapi import json_body
from serve_app.profiles import (
    DEFAULT_PROFILE,
    KIND,
    Role,
    parse_profiles,
    read_profiles,
    with_role_defaults,
)
from serve_app.providers.base import JSON
from serve_app.provision.manager import LLMModelManager, ProvisionRequest, role_models
from serve_app.registry.actor import Answer, Published, RegistryRef
from serve_app.registry.adapters import AdapterRegistration
from serve_app.registry.manifest import (
    Manifest,
    WeightsUpdate,
    effective_config,
    unplaced_adapters,
)
from serve_app.schemas import (
    TIMEOUT_HEADER,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Endpoint,
    RequestMeta,
    parse_timeout,
    validate_request,
)
from serve_app.serve_env import REPLICA_CPUS

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
ADMIN_MAX_BODY_BYTES = 1024 * 1024
Body = TypeVar("Body", bound=BaseModel)
# How much longer than a request's deadline the ingress waits for the router's own 504.
HOP_SLACK_S = 5.0
# Names the model that served a request its own model could not (fallback_model).
FALLBACK_HEADER = "x-router-fallback-model"
METRICS_PUSH_S = 1.0

api = FastAPI(
    title="serve-router", version="0.1.0", description="OpenAI-compatible LLM router on Ray Serve"
)


def _error(err: RouterError) -> Response:
    return Response(err.body(), status_code=err.status, media_type=JSON, headers=err.headers)


def _request_id() -> str:
    """Serve's id for this request: the client's `x-request-id` if it sent one, else generated.

    Serve also writes it back as the response's `x-request-id`, so the router does not.
    """
    return ray.serve.context._get_serve_request_context().request_id or uuid.uuid4().hex


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error(RouterError(exc.status_code, str(exc.detail), code=code))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _error(RouterError(400, str(exc.errors()[0].get("msg", "invalid request"))))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in the ingress")
    return _error(
        RouterError(500, "internal error in the router", type="api_error", code="internal_error")
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RouterError(413, f"request body over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RouterError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _rest(
    gen: DeploymentResponseGenerator,
    on_first: Callable[[], None] | None,
    on_end: Callable[[], None],
) -> AsyncIterator[bytes]:
    """The stream's body; a client that leaves early cancels the router's call (and upstream)."""
    finished = False
    try:
        async for chunk in gen:
            if on_first is not None:
                on_first()
                on_first = None
            yield chunk
        finished = True
    finally:
        on_end()
        if not finished:
            gen.cancel()


def _coalescer(handle: DeploymentHandle) -> Coalescer[tuple[bytes, RequestMeta], Unary]:
    one = handle.options(method_name="unary")
    many = handle.options(method_name="unary_many", stream=True)

    async def send_one(call: tuple[bytes, RequestMeta]) -> Unary:
        return await one.remote(*call)

    def send_many(calls: list[tuple[bytes, RequestMeta]]) -> AsyncIterator[tuple[int, Unary]]:
        return many.remote(calls)

    return Coalescer(send_one, send_many)


async def _admin_body(
    request: Request, model: type[Body], code: str, empty: bytes | None = None
) -> Body:
    """An admin request's JSON body as `model` (`empty` stands for a missing body); 400 with
    the first problem otherwise."""
    body = await read_body(request, ADMIN_MAX_BODY_BYTES)
    if not body and empty is not None:
        body = empty
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RouterError(400, _first_problem(exc), code=code) from None


def _relayed(answer: object) -> Response:
    """A registry actor's Answer, as the HTTP response it describes."""
    assert isinstance(answer, Answer)
    return Response(answer.body, status_code=answer.status, media_type=JSON)


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def _with_model(body: bytes, model: str) -> bytes:
    doc = orjson.loads(body)
    doc["model"] = model
    return orjson.dumps(doc)


Routed = Unary | tuple[Head, DeploymentResponseGenerator]


def _router_error(status: int, message: str) -> RouterError:
    code = {503: "router_unavailable", 504: "deadline_exceeded"}[status]
    return RouterError(status, f"{message}; retry", type="api_error", code=code)


def _not_deployed(model_type: str) -> RouterError:
    return RouterError(
        503,
        f"model type {model_type!r} has no router deployment yet; redeploy the app "
        "(serve deploy) to serve it",
        type="api_error",
        code="model_type_not_deployed",
    )


class IngressSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The models config file that `POST /api/v1/config/reload` and the watcher re-read.
    config_path: str
    # configs/llm_models.json, re-read with the models config; None: no profiles.
    profiles_path: str | None = None
    active_profile: str = DEFAULT_PROFILE
    watch_config: bool = False
    # How long an admin change waits for every replica to confirm it before answering.
    ack_timeout_s: float = 5.0


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=2000)
@serve.ingress(api)
class Ingress:
    async def __init__(
        self,
        routers: dict[str, DeploymentHandle],
        registry: RegistryRef,
        settings: IngressSettings,
    ) -> None:
        keep_replica_grpc_on_loopback()  # before Serve opens this replica's gRPC server
        self._unary = {t: _coalescer(h) for t, h in routers.items()}
        self._stream = {t: h.options(method_name="stream", stream=True) for t, h in routers.items()}
        self._settings = settings
        self._admin_token = os.environ.get(ADMIN_TOKEN_ENV)
        self._type_of: dict[str, str] = {}
        self._unplaced: frozenset[str] = frozenset()  # adapters loaded on no server now
        self._fallbacks: dict[str, str] = {}
        self._timeouts: dict[str, float] = {}
        self._models = b""
        self._id = f"ingress:{serve.get_replica_context().replica_id.unique_id}"
        self._tally = Tally()
        self._registry = registry
        self._roles: dict[str, Role] = {}
        self._role_models: dict[str, str] = {}
        self._manager: LLMModelManager | None = None
        self._monitor_handle: ActorHandle | None = None
        self._follower = Follower(registry.handle, self._id, Manifest(), self._apply)
        await self._follower.start()
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        self._watcher = (
            asyncio.get_running_loop().create_task(self._watch()) if settings.watch_config else None
        )

    def _apply(self, manifest: Manifest) -> None:
        config = effective_config(manifest)
        parents = {name: adapter.base_model for name, adapter in manifest.adapters.items()}
        self._roles = manifest.roles()
        self._role_models = role_models(config, self._roles)
        if self._manager is None:
            self._manager = LLMModelManager(self._roles, config, self._registry)
        else:
            self._manager.update(self._roles, config)
        self._type_of = config.model_type_of()
        self._unplaced = unplaced_adapters(manifest, config)
        self._fallbacks = {
            name: model.fallback_model
            for group in config.model_types.values()
            for name, model in group.models.items()
            if model.fallback_model is not None
        }
        self._timeouts = {t: g.routing.request_timeout_s for t, g in config.model_types.items()}
        models = [
            {"id": name, "object": "model", "created": 0, "owned_by": group}
            | ({"parent": parents[name]} if name in parents else {})
            for group, names in ApiModelConfig(config).active_names().items()
            for name in names
        ]
        # Roles of the active profile, named as clients send them; `root`: the model serving it.
        roles = [
            {
                "id": key,
                "object": "model",
                "created": 0,
                "owned_by": self._type_of[model],
                "root": model,
            }
            for key, model in self._role_models.items()
            if key not in self._type_of and model in self._type_of
        ]
        self._models = orjson.dumps({"object": "list", "data": models + roles})

    async def __del__(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._pusher.cancel()
        await self._follower.stop()

    def _monitor(self) -> ActorHandle:
        if self._monitor_handle is None:
            self._monitor_handle = monitor_handle(self._registry)
        return self._monitor_handle

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PUSH_S)
            try:
                await asyncio.wait_for(
                    self._monitor().push_metrics.remote(self._id, self._tally.snapshot()),
                    METRICS_PUSH_S,
                )
            except Exception:
                self._monitor_handle = None

    async def _relay(self, endpoint: Endpoint, request: Request) -> Response:
        started = time.perf_counter()
        request_id = _request_id()
        model = ""
        try:
            body = await read_body(request, self._settings.max_body_bytes)
            meta = validate_request(endpoint, body, request_id)
            key = meta.model.lower()
            if meta.model not in self._type_of and key in self._role_models:
                # A role of the active profile: the model serving it, with the role's defaults.
                doc = with_role_defaults(
                    orjson.loads(body), self._roles[key], self._role_models[key]
                )
                body = orjson.dumps(doc)
                meta = validate_request(endpoint, body, request_id)
            meta = meta._replace(timeout_s=parse_timeout(request.headers.get(TIMEOUT_HEADER)))
            model_type = self._type_of.get(meta.model)
            if model_type is None:
                if meta.model in self._unplaced:
                    raise adapter_unavailable(meta.model)
                raise model_not_found(meta.model)
            model = meta.model
            if model_type not in self._unary:
                raise _not_deployed(model_type)
        except RouterError as err:
            return self._answered(model, started, error_answer(err))
        # A backstop only: the router ends the request at its deadline and answers 504 itself.
        wait = min(self._timeouts[model_type], meta.timeout_s or float("inf")) + HOP_SLACK_S
        try:
            async with asyncio.timeout(wait):
                routed = await self._call(model_type, body, meta)
                served = [meta.model]
                while isinstance(routed, Unary) and routed.head.headers.pop(UNSERVABLE_HEADER, ""):
                    fallback = self._fallbacks.get(served[-1])
                    if fallback is None or fallback in served or fallback not in self._type_of:
                        break
                    served.append(fallback)
                    log.warning(
                        "model unservable; using its fallback",
                        extra={"request_id": request_id, "model": model, "fallback": fallback},
                    )
                    body = _with_model(body, fallback)
                    meta = meta._replace(model=fallback)
                    routed = await self._call(self._type_of[fallback], body, meta)
                if len(served) > 1:
                    head = routed.head if isinstance(routed, Unary) else routed[0]
                    head.headers[FALLBACK_HEADER] = served[-1]
                if not isinstance(routed, Unary):
                    return self._streamed(model, started, *routed)
                answer = routed
        except TimeoutError:
            log.warning("router call timed out", extra={"request_id": request_id})
            answer = error_answer(_router_error(504, "the router did not answer in time"))
        except Exception:
            log.exception("router call failed", extra={"request_id": request_id})
            answer = error_answer(_router_error(503, "the router for this model is unavailable"))
        answer.head.headers.pop(UNSERVABLE_HEADER, None)
        return self._answered(model, started, answer)

    async def _call(self, model_type: str, body: bytes, meta: RequestMeta) -> Routed:
        """The router's answer; a stream that failed before its first byte, collected."""
        if model_type not in self._unary:
            return error_answer(_not_deployed(model_type))
        if not meta.stream:
            return await self._unary[model_type].call((body, meta))
        gen = self._stream[model_type].remote(body, meta)
        head: Head = await gen.__anext__()
        if head.status != 200:
            return Unary(head, b"".join([chunk async for chunk in gen]))
        return head, gen

    def _count(self, model: str, head: Head, started: float, first: float | None) -> None:
        tally = self._tally
        provider = head.headers.get(PROVIDER_HEADER, "")
        tally.inc("llm_router_requests", (model, provider, str(head.status)))
        if model:
            now = time.perf_counter()
            tally.observe("llm_router_request_duration_seconds", (model,), now - started)
            tally.observe(
                "llm_router_time_to_first_token_seconds", (model,), (first or now) - started
            )
            extra = int(head.headers.get(ATTEMPTS_HEADER, "1")) - 1
            if extra > 0:
                tally.inc("llm_router_failovers", (model,), extra)

    def _answered(self, model: str, started: float, answer: Unary) -> Response:
        head, out = answer
        self._count(model, head, started, None)
        return Response(
            out, status_code=head.status, media_type=head.content_type, headers=head.headers
        )

    def _streamed(
        self, model: str, started: float, head: Head, gen: DeploymentResponseGenerator
    ) -> Response:
        first: list[float] = []
        return StreamingResponse(
            _rest(
                gen,
                lambda: first.append(time.perf_counter()),
                lambda: self._count(model, head, started, first[0] if first else None),
            ),
            status_code=head.status,
            media_type=head.content_type,
            headers={**head.headers, "cache-control": "no-cache"},
        )

    @api.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._relay(Endpoint.CHAT, request)

    @api.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._relay(Endpoint.COMPLETIONS, request)

    @api.post("/v1/embeddings", openapi_extra=json_body(EmbeddingRequest))
    async def embeddings(self, request: Request) -> Response:
        return await self._relay(Endpoint.EMBEDDINGS, request)

    @api.get("/v1/models")
    async def models(self) -> Response:
        return Response(self._models, media_type=JSON)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text for the whole app (every replica's totals, provider health)."""
        try:
            text = await asyncio.wait_for(
                self._monitor().render_metrics.remote(self._id, self._tally.snapshot()), 5.0
            )
        except Exception:
            self._monitor_handle = None
            return _error(_router_error(503, "metrics are unavailable"))
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    # --- admin API -------------------------------------------------------------------------

    def _refusal(self, request: Request) -> Response | None:
        err = admin_refusal(request.headers.get("authorization"), self._admin_token)
        return None if err is None else _error(err)

    async def _registry_call(self, method: str, *args: object) -> object:
        try:
            return await getattr(self._follower.actor(), method).remote(*args)
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

    async def _publish_file(self) -> dict[str, object]:
        """Re-read the models config file and publish it; RouterError (400) if it is invalid."""
        settings = self._settings
        try:
            raw, source = read_raw(settings.config_path)
            types = set(parse_config(raw, source).model_types)
            profiles = (
                None if settings.profiles_path is None else read_profiles(settings.profiles_path)
            )
            if profiles is not None:  # both files valid before either is published
                parse_profiles(*profiles).roles(settings.active_profile)
            published = await self._registry_call("publish_config", raw, source)
            assert isinstance(published, Published)
            changed = published.checked(source).changed
            if profiles is not None:
                published = await self._registry_call(
                    "publish_profiles", *profiles, settings.active_profile
                )
                assert isinstance(published, Published)
                changed |= published.checked(profiles[1], KIND).changed
        except ConfigError as exc:
            raise RouterError(400, str(exc), code="invalid_config") from None
        unconfirmed = await self._registry_call(
            "wait_for_followers", published.version, self._settings.ack_timeout_s
        )
        return {
            "version": published.version,
            "changed": changed,  # the models config, the profiles or both
            "source": source,
            # Model types with no router deployment yet: `serve deploy` adds them.
            "needs_redeploy": sorted(types - set(self._unary)),
            "unconfirmed_replicas": unconfirmed,
        }

    async def _watch(self) -> None:
        path = Path(self._settings.config_path).resolve()
        async for _ in watchfiles.awatch(
            path.parent, watch_filter=lambda _, changed: Path(changed) == path
        ):
            try:
                answer = await self._publish_file()
            except RouterError as err:
                log.warning("watched config rejected", extra={"reason": err.message})
            else:
                log.info("watched config published", extra={"version": answer["version"]})

    @api.post("/api/v1/config/reload")
    async def reload_config(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            return Response(orjson.dumps(await self._publish_file()), media_type=JSON)
        except RouterError as err:
            return _error(err)

    @api.post("/api/v1/weights", openapi_extra=json_body(WeightsUpdate))
    async def set_weights(self, request: Request) -> Response:
        """Runtime weights (weighted, dynamic_weighted, weighted_random): written into the
        published models config as a new version, until the file is reloaded."""
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            update = await _admin_body(request, WeightsUpdate, "invalid_weights")
            published = await self._registry_call("publish_weights", update)
            assert isinstance(published, Published)
            try:
                published.checked(self._follower.state.config_source)
            except ConfigError as exc:
                raise RouterError(400, str(exc), code="invalid_weights") from None
            unconfirmed = await self._registry_call(
                "wait_for_followers", published.version, self._settings.ack_timeout_s
            )
        except RouterError as err:
            return _error(err)
        body = {
            "version": published.version,
            "changed": published.changed,
            "model": update.model,
            "weights": update.weights,
            "unconfirmed_replicas": unconfirmed,
        }
        return Response(orjson.dumps(body), media_type=JSON)

    @api.get("/api/v1/providers/state")
    async def provider_state(self, request: Request) -> Response:
        """The shared routing state: slots taken per provider and by which replica, host pins,
        requests waiting for a slot, use counts, latency averages, keep-alive warms."""
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            state = await asyncio.wait_for(broker_handle(self._registry).state.remote(), 5.0)
        except Exception:
            return _error(_router_error(503, "the routing state is unavailable"))
        return Response(orjson.dumps(state), media_type=JSON)

    @api.get("/api/v1/config")
    async def config_status(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            followers = await self._registry_call("followers")
        except RouterError as err:
            return _error(err)
        manifest = self._follower.state
        body = {
            "version": manifest.version,
            "source": manifest.config_source,
            "models": {
                t: sorted(m for m, g in self._type_of.items() if g == t) for t in self._unary
            },
            "replicas": followers,
        }
        return Response(orjson.dumps(body), media_type=JSON)

    @api.get("/api/v1/models")
    async def model_profiles(self, request: Request) -> Response:
        """The active profile with its resolved roles, and every profile in the manifest."""
        if (refused := self._refusal(request)) is not None:
            return refused
        manifest = self._follower.state
        roles = {
            key: role.model_dump() | {"model": self._role_models.get(key)}
            for key, role in self._roles.items()
        }
        body = {
            "active_profile": manifest.active_profile,
            "source": manifest.profiles_source or None,
            "roles": roles,
            "profiles": sorted((manifest.profiles or {}).get("profiles", {})),
        }
        return Response(orjson.dumps(body), media_type=JSON)

    @api.post("/api/v1/models/provision", openapi_extra=json_body(ProvisionRequest))
    async def provision(self, request: Request) -> Response:
        """Ensure the roles' models are on their providers; monGARS's provisioning report."""
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            req = await _admin_body(request, ProvisionRequest, "invalid_request", b"{}")
        except RouterError as err:
            return _error(err)
        assert self._manager is not None
        report = await self._manager.ensure_models_installed(req.roles, req.force)
        return Response(orjson.dumps(report), media_type=JSON)

    @api.post("/api/v1/adapters", openapi_extra=json_body(AdapterRegistration))
    async def register_adapter(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            req = await _admin_body(request, AdapterRegistration, "invalid_adapter")
            answer = await self._registry_call(
                "register_adapter", req, self._settings.ack_timeout_s
            )
        except RouterError as err:
            return _error(err)
        return _relayed(answer)

    @api.delete("/api/v1/adapters/{name}")
    async def delete_adapter(self, name: str, request: Request) -> Response:
        """The adapter stops being a model at once; its versions are unloaded from every server
        once no request uses them."""
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            answer = await self._registry_call("delete_adapter", name, self._settings.ack_timeout_s)
        except RouterError as err:
            return _error(err)
        return _relayed(answer)

    @api.get("/api/v1/adapters")
    async def list_adapters(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        try:
            answer = await self._registry_call("adapters")
        except RouterError as err:
            return _error(err)
        return _relayed(answer)
