"""Where every inference request goes, whatever its dialect: checked, resolved to a model
(a role of the active profile, a fallback), planned by its model type's picker, and answered
with the upstream's bytes, which this replica fetches and relays itself (errors rewritten in
the client's dialect).

Only a small RequestMeta tuple (with, where the model routes by them, the prompt's text block
hashes; and for kv_aware its KV block keys) crosses to the picker; the body is parsed once
here (by pydantic-core) and translated only for the provider the plan names.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.access.gate import Admission, Gate, flow_terms
from serve_app.access.reserve import requested_output
from serve_app.api.http import read_body, request_id
from serve_app.cluster.registry.manifest import Manifest, unplaced_adapters
from serve_app.conversations.service import Conversations, Turn
from serve_app.core.config import SLOT_STRATEGIES, RouterConfig, RoutingConfig, StrategyName
from serve_app.core.errors import RouterError, adapter_unavailable, model_not_found
from serve_app.core.metrics import BODIES_METRIC
from serve_app.core.schemas import (
    SESSION_HEADER,
    TIMEOUT_HEADER,
    BodyLimits,
    Endpoint,
    RequestMeta,
    parse_timeout,
    validate_request,
)
from serve_app.core.tokens import CHARS_PER_TOKEN
from serve_app.dialects.translate import error_in_dialect
from serve_app.dialects.usage import Counts, StreamMeter, counts_of
from serve_app.ingress.picking import PickerLink
from serve_app.ingress.relay import (
    Deadline,
    Keeper,
    Limits,
    Relay,
    Route,
    Streamed,
    call_limits,
    count_prediction,
)
from serve_app.pickers.handler import ApiModelConfig
from serve_app.pickers.plan import (
    ATTEMPTS_HEADER,
    PROVIDER_HEADER,
    UNSERVABLE_HEADER,
    Head,
    Unary,
    error_answer,
)
from serve_app.provision.manager import role_models
from serve_app.provision.profiles import Role, with_role_defaults
from serve_app.routing.kv.tokens import PromptKeys, tokenizer_for
from serve_app.routing.prefix import request_blocks

log = logging.getLogger("ray.serve")

# How much longer than a request's deadline the ingress waits for its picker and first bytes.
HOP_SLACK_S = 5.0
# OpenAI streams whose usage chunk the router asks for when it counts a key's tokens.
_USAGE_CHUNK = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})
# For a model the manifest dropped while its request was under way.
DEFAULT_LIMITS = call_limits(RoutingConfig())
# Names the model that served a request its own model could not (fallback_model).
FALLBACK_HEADER = "x-router-fallback-model"
# On every answer: its content type is the router's (JSON, SSE, NDJSON), not to be guessed.
NOSNIFF = {"x-content-type-options": "nosniff"}


async def _metered(body: AsyncIterator[bytes], meter: StreamMeter) -> AsyncIterator[bytes]:
    """The stream's body, its token counts read on the way (the meter may take out what the
    client did not ask)."""
    async for chunk in body:
        if chunk := meter.feed(chunk):
            yield chunk
    if tail := meter.tail():
        yield tail


class _Relayed(StreamingResponse):
    """A relayed stream; `on_end` runs when the response is over however it ends (to the last
    byte, the client leaving, or before its body was ever read)."""

    def __init__(self, content: AsyncIterator[bytes], on_end: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()


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


def _with_model(body: bytes, model: str) -> bytes:
    doc = orjson.loads(body)
    doc["model"] = model
    return orjson.dumps(doc)


def _allowed(admission: Admission | None) -> Callable[[str], bool]:
    """Which models a request may be served by: its key's (any without keys)."""
    return (lambda _: True) if admission is None else admission.record.allows


def kv_prompts(
    config: RouterConfig, strategies: Mapping[str, str], adapters: Mapping[str, str]
) -> dict[str, PromptKeys]:
    """The kv_aware models with a tokenizer, each tokenizer loaded now (not on a request's
    path); one that cannot be loaded leaves its model routed by load alone, with a warning.
    `adapters`: LoRA adapter name -> its base model."""
    out = {}
    for group in config.model_types.values():
        for name, model in group.models.items():
            if strategies.get(name) != "kv_aware" or model.tokenizer is None:
                continue
            try:
                tokenizer_for(model.tokenizer)
            except Exception as exc:  # a missing or broken folder, whatever it raises
                log.warning(
                    "kv_aware tokenizer not loaded",
                    extra={"model": name, "reason": f"{type(exc).__name__}: {exc}"},
                )
                continue
            # vLLM names an adapter's blocks by the name it was loaded under (its version's)
            lora = model.providers[0].model_path if name in adapters else None
            out[name] = PromptKeys(model.tokenizer, model.kv_block_size, lora)
    return out


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


class BodyRules(NamedTuple):
    """What an inference request's body may be: its bytes, how long it may take to arrive,
    what it may hold."""

    max_bytes: int
    timeout_s: float
    limits: BodyLimits


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
        self,
        pickers: dict[str, PickerLink],
        relay: Relay,
        body: BodyRules,
        gate: Gate,
        default_strategy: StrategyName,
        conversations: Conversations,
    ) -> None:
        self._pickers = pickers
        self._relay = relay
        self.conversations = conversations
        # Providers that keep their own Responses (vLLM with its store: responses_store).
        self._keepers: frozenset[str] = frozenset()
        self._input_sizes: dict[str, int] = {}  # by model: its largest provider's input_size
        self._default_strategy = default_strategy
        self.model_types = frozenset(pickers)
        self._routing: dict[str, RoutingConfig] = {}
        self._limits: dict[str, Limits] = {}  # by model
        # Models whose requests carry their text block hashes: their block size.
        self._prefix_chars: dict[str, int] = {}
        self._kv_prompts: dict[str, PromptKeys] = {}  # kv_aware models with a tokenizer
        self._slot_models: frozenset[str] = frozenset()  # first_available* models
        self.body = body
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
        for link in self._pickers.values():
            link.reset()
        self.conversations.limit(config.responses)
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
        everyone = {  # each model's providers, sleeping ones included
            name: model.providers + model.providers_sleep
            for group in groups
            for name, model in group.models.items()
        }
        self.tools = frozenset(
            name for name, ps in everyone.items() if any(p.tool_calling for p in ps)
        )
        self._timeouts = {t: g.routing.request_timeout_s for t, g in config.model_types.items()}
        self._keepers = frozenset(p.id for ps in everyone.values() for p in ps if p.responses_store)
        self._input_sizes = {name: max(p.input_size for p in ps) for name, ps in everyone.items()}
        self._routing = {name: group.routing for group in groups for name in group.models}
        self._limits = {name: call_limits(r) for name, r in self._routing.items()}
        strategies = {n: r.strategy or self._default_strategy for n, r in self._routing.items()}
        self._prefix_chars = {
            name: self._routing[name].prefix_block_chars
            for group in groups
            for name, model in group.models.items()
            if model.routes_by_text(strategies[name])
        }
        self._kv_prompts = kv_prompts(config, strategies, parents)
        for name in (n for n, strategy in strategies.items() if strategy == "kv_aware"):
            count_prediction(self.tally, name, None)  # its series, before its first answer
        self._slot_models = frozenset(n for n, s in strategies.items() if s in SLOT_STRATEGIES)
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
        self.openai_models = orjson.dumps(
            {"object": "list", "data": self._openai_models(self.models)}
        )

    def find(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)

    def listed(self, headers: Mapping[str, str], everything: bool = False) -> list[ModelInfo]:
        """The models a request may see: all (`everything`: the admin token), or with keys
        required those its key may use (401 without one)."""
        allowed = None if everything else self.gate.lister(headers)
        if allowed is None:
            return self.models
        return [m for m in self.models if allowed(m.name, m.root)]

    def openai_listing(self, headers: Mapping[str, str], everything: bool = False) -> bytes:
        """The `/v1/models` body for this request."""
        if everything or not self.gate.required:
            return self.openai_models
        return orjson.dumps({"object": "list", "data": self._openai_models(self.listed(headers))})

    async def relay(self, endpoint: Endpoint, request: Request) -> Response:
        started = time.perf_counter()
        rid = request_id()
        model = ""
        dialect = endpoint.dialect
        admission: Admission | None = None
        strip = False
        turn: Turn | None = None
        try:
            # The key first, from the headers alone: without a valid one nothing is read or
            # parsed, and the answer is the same whatever model the body would name.
            self.gate.owner(request.headers)
            body = await read_body(request, self.body.max_bytes, self.body.timeout_s)
            self.tally.inc(BODIES_METRIC, (dialect,))
            meta = validate_request(endpoint, body, rid, self.body.limits)
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
                meta = validate_request(endpoint, body, rid, self.body.limits)
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
            if model_type not in self._pickers:
                raise _not_deployed(model_type)
            admission = await self.gate.admit(
                request.headers,
                (requested, meta.model),
                meta.prompt_tokens,
                lambda: requested_output(endpoint, body),
            )
            if admission is not None and meta.stream and endpoint in _USAGE_CHUNK:
                body, strip = _with_usage(body)
            meta = meta._replace(size=len(body), **flow_terms(admission, request.headers))
            if endpoint is Endpoint.RESPONSES:
                turn = await self.conversations.begin(
                    body, admission.record.id if admission else ""
                )
                body, meta = turn.body, self._continued(turn, meta)._replace(size=len(turn.body))
                if turn.background:
                    return await self._background(turn, model_type, meta, admission, started)
        except RouterError as err:  # a key admitted here is charged nothing for it
            return self._answered(model, endpoint, started, error_answer(err), admission)
        routed = await self._route(
            model_type, body, meta, turn.keeper if turn else None, _allowed(admission)
        )
        if isinstance(routed, Streamed):
            try:
                if turn is not None:
                    provider = routed.head.headers.get(PROVIDER_HEADER, "")
                    keeps = provider in self._keepers
                    tapped = self.conversations.tapped(turn, routed.body, provider, keeps)
                    routed = routed._replace(body=tapped)
                return self._streamed(model, endpoint, started, routed, admission, strip)
            except BaseException:
                routed.end()  # its response never came to be: the upstream call ends
                raise
        if turn is not None:
            await self.conversations.record(turn, routed, self._keepers.__contains__)
        return self._answered(model, endpoint, started, routed, admission)

    def _continued(self, turn: Turn, meta: RequestMeta) -> RequestMeta:
        """A Responses request's meta for its whole conversation: its size, the provider that
        keeps the earlier turns first; 400 when the conversation outgrew the model."""
        if turn.previous is None:
            return meta
        expanded = validate_request(meta.endpoint, turn.body, meta.request_id, self.body.limits)
        tokens = expanded.prompt_tokens
        largest = self._input_sizes.get(meta.model, 0)
        if tokens > largest:
            raise RouterError(
                400,
                f"the conversation (about {tokens} tokens over {turn.turns} turns, with "
                f"previous_response_id) exceeds the input size of every provider of model "
                f"{meta.model} (largest: {largest}); start a new conversation or send less",
                param="previous_response_id",
                code="context_length_exceeded",
            )
        prefer = turn.keeper.provider if turn.keeper else ""
        return meta._replace(prompt_tokens=tokens, prefer=prefer)

    async def _background(
        self,
        turn: Turn,
        model_type: str,
        meta: RequestMeta,
        admission: Admission | None,
        started: float,
    ) -> Response:
        """A background response: queued now, run on this replica, read through the store."""
        meta = meta._replace(stream=False)

        async def run() -> Unary:
            try:
                answer = await self._route(
                    model_type, turn.body, meta, turn.keeper, _allowed(admission)
                )
            except asyncio.CancelledError:  # cancelled or deleted: nothing was used
                if admission is not None:
                    self._settle(admission, meta.model, None, 499, 0)
                raise
            assert isinstance(answer, Unary)
            self._answered(meta.model, meta.endpoint, started, answer, admission)
            return answer

        timeout = min(self._timeouts[model_type], meta.timeout_s or float("inf"))
        queued = await self.conversations.start(turn, timeout, run, self._keepers.__contains__)
        return Response(queued, media_type="application/json")

    async def _route(
        self,
        model_type: str,
        body: bytes,
        meta: RequestMeta,
        keeper: Keeper | None,
        allowed: Callable[[str], bool],
    ) -> Unary | Streamed:
        """The request planned and relayed by its deadline, its model's fallback taken when it
        cannot be served (and its key may use the fallback)."""
        rid = meta.request_id
        deadline = Deadline.within(min(self._timeouts[model_type], meta.timeout_s or float("inf")))
        # A backstop only: the relay ends the request at its deadline and answers 504 itself;
        # this bounds the wait for the picker (a slot strategy waits there for a free slot).
        try:
            async with asyncio.timeout_at(deadline.at + HOP_SLACK_S):
                routed = await self._call(model_type, body, meta, deadline, keeper)
                served = [meta.model]
                while isinstance(routed, Unary) and routed.head.headers.pop(UNSERVABLE_HEADER, ""):
                    fallback = self._fallbacks.get(served[-1])
                    if (
                        fallback is None
                        or fallback in served
                        or fallback not in self.type_of
                        or not allowed(fallback)
                    ):
                        break
                    served.append(fallback)
                    log.warning(
                        "model unservable; using its fallback",
                        extra={"request_id": rid, "model": meta.model, "fallback": fallback},
                    )
                    body = _with_model(body, fallback)
                    meta = meta._replace(model=fallback, prefer="")
                    routed = await self._call(self.type_of[fallback], body, meta, deadline, None)
                if len(served) > 1:
                    routed.head.headers[FALLBACK_HEADER] = served[-1]
                if isinstance(routed, Streamed):
                    return routed
                answer = routed
        except TimeoutError:
            log.warning("router call timed out", extra={"request_id": rid})
            answer = error_answer(router_error(504, "the router did not answer in time"))
        except Exception:
            log.exception("router call failed", extra={"request_id": rid})
            answer = error_answer(router_error(503, "the router for this model is unavailable"))
        answer.head.headers.pop(UNSERVABLE_HEADER, None)
        return answer

    async def _call(
        self,
        model_type: str,
        body: bytes,
        meta: RequestMeta,
        deadline: Deadline,
        keeper: Keeper | None,
    ) -> Unary | Streamed:
        """The model type's picker plans the request; this replica calls the plan's providers."""
        link = self._pickers.get(model_type)
        if link is None:
            return error_answer(_not_deployed(model_type))
        if chars := self._prefix_chars.get(meta.model):
            meta = meta._replace(text_blocks=request_blocks(body, chars))
        prefix: Sequence[int] = ()  # kv_aware's KV block keys
        if (kv := self._kv_prompts.get(meta.model)) is not None:
            prefix, tokens = await kv.of(body)
            if tokens:  # the exact count: the providers' context checks and kv_aware's cost
                meta = meta._replace(prompt_tokens=tokens)
        plan = await link.plan(meta, prefix, meta.model in self._slot_models)
        if plan.queued:  # every provider is full: it waits in the picker's queue
            plan = await link.wait(plan)
        limits = self._limits.get(meta.model) or DEFAULT_LIMITS
        route = Route(plan, link, limits, keeper)
        return await self._relay.call(route, body, meta, deadline)

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
            self._settle(admission, model, counts, head.status, len(out) // CHARS_PER_TOKEN)
            head.headers.update(admission.headers)
        if head.status >= 400:
            out = error_in_dialect(endpoint.dialect, head.status, out)
        return Response(
            out,
            status_code=head.status,
            media_type=head.content_type,
            headers={**head.headers, **NOSNIFF},
        )

    def _streamed(
        self,
        model: str,
        endpoint: Endpoint,
        started: float,
        streamed: Streamed,
        admission: Admission | None,
        strip: bool,
    ) -> Response:
        # Its first bytes have come (the relay read them before answering): they go out now.
        first = time.perf_counter()
        meter = None if admission is None else StreamMeter(endpoint.dialect, strip)
        head = streamed.head

        def ended() -> None:
            streamed.end()
            self._count(model, endpoint, head, started, first)
            if admission is not None and meter is not None:  # cut short: what it relayed
                counts = meter.counts if meter.final else None
                self._settle(admission, model, counts, head.status, meter.relayed)

        return _Relayed(
            streamed.body if meter is None else _metered(streamed.body, meter),
            ended,
            status_code=head.status,
            media_type=head.content_type,
            headers={
                **head.headers,
                **(admission.headers if admission else {}),
                **NOSNIFF,
                "cache-control": "no-cache",
            },
        )

    def _settle(
        self, admission: Admission, model: str, counts: Counts | None, status: int, output: int
    ) -> None:
        """The key's usage: the upstream's counts; a failed request used nothing; an answer
        without counts (or a stream cut before its last ones) is estimated: its prompt
        estimate, and `output` (the body's size / 4, a stream's relayed text) for the rest."""
        if counts is not None:
            self.gate.settle(admission, model, *counts, estimated=False)
        elif status >= 400:
            self.gate.settle(admission, model, 0, 0, estimated=False)
        else:
            self.gate.settle(admission, model, admission.estimate, output, estimated=True)

    def _openai_models(self, models: list[ModelInfo]) -> list[dict[str, Any]]:
        """`/v1/models` entries: adapters name their `parent`, roles their `root`."""
        out = []
        for m in models:
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
