"""Where every inference request goes, whatever its dialect: checked, resolved to a model
(a role of the active profile, a fallback), handed to its model type's router deployment, and
answered with the router's bytes (errors rewritten in the client's dialect).

The body crosses the hop as the client's raw bytes plus a small RequestMeta tuple, so it is
parsed once here (by pydantic-core) and translated only in the router, for the provider chosen.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_app.access.gate import Admission, Gate
from serve_app.api.http import read_body, request_id
from serve_app.coalesce import Coalescer
from serve_app.config import RouterConfig
from serve_app.dialects.translate import error_in_dialect
from serve_app.dialects.usage import Counts, StreamMeter, counts_of
from serve_app.dispatch import (
    ATTEMPTS_HEADER,
    PROVIDER_HEADER,
    UNSERVABLE_HEADER,
    Head,
    Unary,
    error_answer,
)
from serve_app.errors import RouterError, adapter_unavailable, model_not_found
from serve_app.handler import ApiModelConfig
from serve_app.profiles import Role, with_role_defaults
from serve_app.provision.manager import role_models
from serve_app.registry.manifest import Manifest, unplaced_adapters
from serve_app.schemas import (
    SESSION_HEADER,
    TIMEOUT_HEADER,
    Endpoint,
    RequestMeta,
    parse_timeout,
    validate_request,
)

log = logging.getLogger("ray.serve")

# How much longer than a request's deadline the ingress waits for the router's own 504.
HOP_SLACK_S = 5.0
# OpenAI streams whose usage chunk the router asks for when it counts a key's tokens.
_USAGE_CHUNK = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})
# Names the model that served a request its own model could not (fallback_model).
FALLBACK_HEADER = "x-router-fallback-model"

Routed = Unary | tuple[Head, DeploymentResponseGenerator]


async def _rest(
    gen: DeploymentResponseGenerator,
    on_first: Callable[[], None] | None,
    on_end: Callable[[], None],
    meter: StreamMeter | None,
) -> AsyncIterator[bytes]:
    """The stream's body; a client that leaves early cancels the router's call (and upstream).
    `meter` reads the token counts on the way (and may take out what the client did not ask)."""
    finished = False
    try:
        async for chunk in gen:
            if on_first is not None:
                on_first()
                on_first = None
            if meter is not None:
                chunk = meter.feed(chunk)
            if chunk:
                yield chunk
        if meter is not None and (tail := meter.tail()):
            yield tail
        finished = True
    finally:
        on_end()
        if not finished:
            gen.cancel()


def _with_usage(body: bytes) -> tuple[bytes, bool]:
    """An OpenAI stream request that asks for the usage chunk; True if the client had not (the
    chunk is then taken out of its stream)."""
    doc = orjson.loads(body)
    options = doc.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return body, False
    doc["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return orjson.dumps(doc), True


def _coalescer(handle: DeploymentHandle) -> Coalescer[tuple[bytes, RequestMeta], Unary]:
    one = handle.options(method_name="unary")
    many = handle.options(method_name="unary_many", stream=True)

    async def send_one(call: tuple[bytes, RequestMeta]) -> Unary:
        return await one.remote(*call)

    def send_many(calls: list[tuple[bytes, RequestMeta]]) -> AsyncIterator[tuple[int, Unary]]:
        return many.remote(calls)

    return Coalescer(send_one, send_many)


def _with_model(body: bytes, model: str) -> bytes:
    doc = orjson.loads(body)
    doc["model"] = model
    return orjson.dumps(doc)


def router_error(status: int, message: str) -> RouterError:
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


class ModelInfo(NamedTuple):
    """A model clients can name: a configured model, an adapter (`parent`: its base model) or a
    role of the active profile (`root`: the model serving it)."""

    name: str
    model_type: str
    parent: str | None
    root: str | None


class Gateway:
    """The ingress replica's inference path, and what it knows of the models from the manifest."""

    def __init__(
        self, routers: dict[str, DeploymentHandle], max_body_bytes: int, gate: Gate
    ) -> None:
        self._unary = {t: _coalescer(h) for t, h in routers.items()}
        self._stream = {t: h.options(method_name="stream", stream=True) for t, h in routers.items()}
        self.model_types = frozenset(routers)
        self._max_body_bytes = max_body_bytes
        self.type_of: dict[str, str] = {}
        self._unplaced: frozenset[str] = frozenset()  # adapters loaded on no server now
        self._fallbacks: dict[str, str] = {}
        self._timeouts: dict[str, float] = {}
        self.roles: dict[str, Role] = {}
        self.role_models: dict[str, str] = {}
        self.models: list[ModelInfo] = []
        self.tools: frozenset[str] = frozenset()  # models with a tool-calling provider
        self.openai_models = b""  # the `/v1/models` body
        self.gate = gate
        self.tally = gate.tally

    def apply(self, manifest: Manifest, config: RouterConfig) -> None:
        """`config`: the manifest's effective models config."""
        parents = {name: adapter.base_model for name, adapter in manifest.adapters.items()}
        self.roles = manifest.roles()
        self.role_models = role_models(config, self.roles)
        self.type_of = config.model_type_of()
        self._unplaced = unplaced_adapters(manifest, config)
        groups = config.model_types.values()
        self._fallbacks = {
            name: model.fallback_model
            for group in groups
            for name, model in group.models.items()
            if model.fallback_model is not None
        }
        self.tools = frozenset(
            name
            for group in groups
            for name, model in group.models.items()
            if any(p.tool_calling for p in model.providers + model.providers_sleep)
        )
        self._timeouts = {t: g.routing.request_timeout_s for t, g in config.model_types.items()}
        active = ApiModelConfig(config).active_names()
        self.models = [
            ModelInfo(name, group, parents.get(name), None)
            for group, names in active.items()
            for name in names
        ] + [
            # Roles of the active profile, named as clients send them; `root`: the model.
            ModelInfo(key, self.type_of[model], None, model)
            for key, model in self.role_models.items()
            if key not in self.type_of and model in self.type_of
        ]
        self.openai_models = orjson.dumps({"object": "list", "data": self._openai_models()})

    def find(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)

    async def relay(self, endpoint: Endpoint, request: Request) -> Response:
        started = time.perf_counter()
        rid = request_id()
        model = ""
        dialect = endpoint.dialect
        admission: Admission | None = None
        strip = False
        try:
            body = await read_body(request, self._max_body_bytes)
            meta = validate_request(endpoint, body, rid)
            requested = meta.model
            key = meta.model.lower()
            if meta.model not in self.type_of and key in self.role_models:
                # A role of the active profile: the model serving it (OpenAI requests also take
                # the role's defaults; other dialects name their parameters differently).
                served = self.role_models[key]
                if dialect == "openai":
                    body = orjson.dumps(
                        with_role_defaults(orjson.loads(body), self.roles[key], served)
                    )
                else:
                    body = _with_model(body, served)
                meta = validate_request(endpoint, body, rid)
            meta = meta._replace(
                timeout_s=parse_timeout(request.headers.get(TIMEOUT_HEADER)),
                session=request.headers.get(SESSION_HEADER) or meta.session,
            )
            model_type = self.type_of.get(meta.model)
            if model_type is None:
                if meta.model in self._unplaced:
                    raise adapter_unavailable(meta.model)
                raise model_not_found(meta.model)
            model = meta.model
            if model_type not in self._unary:
                raise _not_deployed(model_type)
            admission = await self.gate.admit(
                request.headers, (requested, meta.model), meta.prompt_tokens
            )
            if admission is not None and meta.stream and endpoint in _USAGE_CHUNK:
                body, strip = _with_usage(body)
        except RouterError as err:
            return self._answered(model, endpoint, started, error_answer(err), None)
        # A backstop only: the router ends the request at its deadline and answers 504 itself.
        wait = min(self._timeouts[model_type], meta.timeout_s or float("inf")) + HOP_SLACK_S
        try:
            async with asyncio.timeout(wait):
                routed = await self._call(model_type, body, meta)
                served = [meta.model]
                while isinstance(routed, Unary) and routed.head.headers.pop(UNSERVABLE_HEADER, ""):
                    fallback = self._fallbacks.get(served[-1])
                    if fallback is None or fallback in served or fallback not in self.type_of:
                        break
                    served.append(fallback)
                    log.warning(
                        "model unservable; using its fallback",
                        extra={"request_id": rid, "model": model, "fallback": fallback},
                    )
                    body = _with_model(body, fallback)
                    meta = meta._replace(model=fallback)
                    routed = await self._call(self.type_of[fallback], body, meta)
                if len(served) > 1:
                    head = routed.head if isinstance(routed, Unary) else routed[0]
                    head.headers[FALLBACK_HEADER] = served[-1]
                if not isinstance(routed, Unary):
                    return self._streamed(model, endpoint, started, *routed, admission, strip)
                answer = routed
        except TimeoutError:
            log.warning("router call timed out", extra={"request_id": rid})
            answer = error_answer(router_error(504, "the router did not answer in time"))
        except Exception:
            log.exception("router call failed", extra={"request_id": rid})
            answer = error_answer(router_error(503, "the router for this model is unavailable"))
        answer.head.headers.pop(UNSERVABLE_HEADER, None)
        return self._answered(model, endpoint, started, answer, admission)

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

    def _count(
        self, model: str, endpoint: Endpoint, head: Head, started: float, first: float | None
    ) -> None:
        tally = self.tally
        provider = head.headers.get(PROVIDER_HEADER, "")
        tally.inc("llm_router_requests", (model, provider, str(head.status), endpoint.dialect))
        if model:
            now = time.perf_counter()
            tally.observe("llm_router_request_duration_seconds", (model,), now - started)
            tally.observe(
                "llm_router_time_to_first_token_seconds", (model,), (first or now) - started
            )
            extra = int(head.headers.get(ATTEMPTS_HEADER, "1")) - 1
            if extra > 0:
                tally.inc("llm_router_failovers", (model,), extra)

    def _answered(
        self,
        model: str,
        endpoint: Endpoint,
        started: float,
        answer: Unary,
        admission: Admission | None,
    ) -> Response:
        head, out = answer
        self._count(model, endpoint, head, started, None)
        if admission is not None:
            counts = None
            if head.status == 200:
                with contextlib.suppress(orjson.JSONDecodeError):
                    counts = counts_of(endpoint.dialect, orjson.loads(out))
            self._settle(admission, model, counts, head.status, len(out))
            head.headers.update(admission.headers)
        if head.status >= 400:
            out = error_in_dialect(endpoint.dialect, head.status, out)
        return Response(
            out, status_code=head.status, media_type=head.content_type, headers=head.headers
        )

    def _streamed(
        self,
        model: str,
        endpoint: Endpoint,
        started: float,
        head: Head,
        gen: DeploymentResponseGenerator,
        admission: Admission | None,
        strip: bool,
    ) -> Response:
        first: list[float] = []
        meter = None if admission is None else StreamMeter(endpoint.dialect, strip)

        def ended() -> None:
            self._count(model, endpoint, head, started, first[0] if first else None)
            if admission is not None and meter is not None:
                self._settle(admission, model, meter.counts, head.status, 0)

        return StreamingResponse(
            _rest(gen, lambda: first.append(time.perf_counter()), ended, meter),
            status_code=head.status,
            media_type=head.content_type,
            headers={
                **head.headers,
                **(admission.headers if admission else {}),
                "cache-control": "no-cache",
            },
        )

    def _settle(
        self, admission: Admission, model: str, counts: Counts | None, status: int, size: int
    ) -> None:
        """The key's usage: the upstream's counts; a failed request used nothing; an answer
        without counts is estimated (its prompt estimate, and its body's size for the rest)."""
        if counts is not None:
            self.gate.settle(admission, model, *counts, estimated=False)
        elif status >= 400:
            self.gate.settle(admission, model, 0, 0, estimated=False)
        else:
            self.gate.settle(admission, model, admission.estimate, size // 4, estimated=True)

    def _openai_models(self) -> list[dict[str, Any]]:
        """`/v1/models` entries: adapters name their `parent`, roles their `root`."""
        out = []
        for m in self.models:
            entry: dict[str, Any] = {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": m.model_type,
            }
            if m.parent is not None:
                entry["parent"] = m.parent
            if m.root is not None:
                entry["root"] = m.root
            out.append(entry)
        return out
